"""Model definitions. Single-device code: parallelism is applied from ``league.parallel``."""
