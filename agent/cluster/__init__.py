"""MagStack clustering: the agent's side of a stack of boxes working as one.

This package holds the etcd supervisor (etcd runs as a supervised child of the agent), membership, the leader lease,
discovery of peers by mDNS (`_thox-cluster._tcp`), the secure join (a k3s-style token that pins the cluster CA,
carried over NFC, then mutual TLS between agents: `pki` and `tokens`), and the request router that spreads
OpenAI-API requests across the stack's replicas.
"""
