"""TUF on the controller: signing keys, the image repository, the per-device director, key and root rotation."""
