"""Signed updates on the device: verify (both repositories agree), fetch, the job state machine, the update round."""
