"""The rollout engine: continuous batching, cache slots, sampling, MTP speculative decoding, HTTP serving."""
