"""The gated delta rule (Gated DeltaNet's token mixer) in three forms.

``naive`` is the recurrent definition and the ground truth; ``chunk`` is the chunked form for training
and prefill; ``recurrent`` steps a batch of requests a few tokens at a time for decode and verify.
"""

from league.ops.gdn.chunk import chunk_gated_delta_rule
from league.ops.gdn.naive import naive_gated_delta_rule
from league.ops.gdn.recurrent import recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "naive_gated_delta_rule", "recurrent_gated_delta_rule"]
