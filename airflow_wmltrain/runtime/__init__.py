"""What a training run is on a Docker host: its container, its GPUs, its workspace on disk."""
