"""HTTP APIs: the OpenAI-compatible inference API (port 8080) and the cluster API (port 5381)."""
