"""Other engines measured on the same machine, model and images as benchmarks.run (llama.cpp)."""
