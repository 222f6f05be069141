"""Models in an OCI registry (the distribution protocol Ollama's registry also speaks): any registry that serves
OCI image manifests works, Debian's docker-registry among them (scripts/model-registry.sh starts one on loopback).

- `artifact`: how a model is laid out as an OCI artifact (a manifest, a config that is the model's card, one layer
  per file) and how a `name:tag` reference names it.
- `client`: the registry's HTTP API (catalog, tags, manifests, blobs with Range, uploads), with errors that say
  which registry and what it answered.
- `push` / `pull`: a store's model to a registry, and a registry's model into a store (resumable, verified by
  digest, installed only when complete).
"""
