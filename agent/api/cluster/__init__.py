"""The cluster API (port 5381): health now; topology, nodes and model placement as the cluster grows."""
