"""Engine-free SJD math in plain torch (no vLLM import)."""
