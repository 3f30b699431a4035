"""Signed updates on the device: verify (what both repositories agree on), fetch (transports and the resumable
download), jobs (states and their allowed moves), steps (the only code that enters a state), store (the update
tables), machine (the Installer: run, restore, rollback, prune) and round (plan from the director's answer, then run)."""
