"""Model files and merge operators: memory-mapped safetensors in, streamed HF dirs out, crossover, mutation, aggregation."""
