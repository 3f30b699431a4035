"""TUF on the controller: signing keys, the shared signing chain, the image repository, the per-device director, rotation."""
