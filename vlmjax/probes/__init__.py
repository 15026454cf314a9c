"""Metrics and captures as hooks (methods §1-§5): per-layer records reduced inside the compiled forward.

Each probe reads a block site and returns a small record per layer (e.g. [B, H] instead of the [B, H, N, N]
pattern), stacked over layers by the layer scan: `out["hooks"][name][site]` is [L, ...] (a dict of such arrays for
probes that return several quantities). The math is `vlmjax.metrics`'; this package only picks the token sets and
wires them to sites, one module per seam:

- `token_sets`: V, the visual tokens (`ctx.visual_mask`, from the input ids, per sample); T, the text after the image
  (`text_after_image`: real tokens after the sample's last visual token; every real token of a sample without
  visual tokens); the query of last-query metrics (`last_position`: the sample's last real token, or a given
  `query_index` [B]).
- `attention`: VisualAttention, LastQueryVisualMap, VisualHeadAttention, head_detection_scores.
- `residual`: LogitLens, ResidualUpdateCosine (+ paired_inputs), UpdateGeometry, HiddenStates, RopeBaseline,
  ResidualRopeBaseline, rank_units.
- `gradients`: residual_gradients, visual_gradient_importance.
- `capture`: `capture(sites, num_layers)` records named sites (`blocks.3.attn.pattern`, `logits`) and only the named
  layers; `read_captures` reads them back.
- `maps`: host-side analysis of attention maps (map_grids, map_statistics, contrastive_mask).
"""

from vlmjax.probes.attention import LastQueryVisualMap, VisualAttention, VisualHeadAttention, head_detection_scores
from vlmjax.probes.capture import capture, read_captures
from vlmjax.probes.gradients import ResidualProbe, residual_gradients, visual_gradient_importance
from vlmjax.probes.maps import contrastive_mask, map_grids, map_statistics
from vlmjax.probes.residual import (GEOMETRY_TOKENS, HiddenStates, LogitLens, ResidualRopeBaseline,
                                    ResidualUpdateCosine, RopeBaseline, UpdateGeometry, paired_inputs, rank_units)
from vlmjax.probes.token_sets import last_position, text_after_image

__all__ = ["GEOMETRY_TOKENS", "HiddenStates", "LastQueryVisualMap", "LogitLens", "ResidualProbe",
           "ResidualRopeBaseline", "ResidualUpdateCosine", "RopeBaseline", "UpdateGeometry", "VisualAttention", "VisualHeadAttention",
           "capture", "contrastive_mask", "head_detection_scores", "last_position", "map_grids", "map_statistics",
           "paired_inputs", "rank_units", "read_captures", "residual_gradients", "text_after_image", "visual_gradient_importance"]
