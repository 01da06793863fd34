"""Reinforcement learning: data, rewards, algorithms, batching, training and the loop."""
