"""Model registry: versions published with their lineage, and labels that route
traffic between versions. Both live inside an ordinary Triton-style repository,
so a plain Triton repository is a registry without metadata or labels, and
Triton ignores the extra files.

One module per concern; import the one you need (this package imports nothing,
so the server's labels reader never pulls in publish's checks):

* `labels`: labels.json (format, read, atomic write under the folder's lock),
  the pure label transitions, and `promote` / `rollback` on a repository.
* `metadata`: metadata.json (format and reader) and signatures as JSON.
* `publish`: a new version, atomically, after checking that it will load.
* `inspect`: list, show and diff versions (read only, problems reported).
* `errors`, `folders`, `files`: what they share (the CLI's error classes,
  model and version lookup, durable writes and the folder lock).
"""
