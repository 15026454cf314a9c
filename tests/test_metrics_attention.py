"""vlmjax.metrics.attention against plain NumPy loops, on masks where the visual tokens sit at different positions per
sample, with left and right padding (whose attention rows are NaN, to prove that padding never leaks in)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", False)
jax.config.update("jax_default_matmul_precision", "highest")

from vlmjax.metrics import attention as am  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
BATCH, HEADS, N_TOKENS, LAYERS = 3, 4, 16, 2
GRID = (3, 3)


def _layout():
    """Masks of three samples: no padding / left padding / right padding; image spans differ per sample."""
    valid = np.zeros((BATCH, N_TOKENS), bool)
    visual = np.zeros((BATCH, N_TOKENS), bool)
    text = np.zeros((BATCH, N_TOKENS), bool)
    valid[0, :] = True
    visual[0, 2:8] = True
    text[0, 8:] = True
    valid[1, 2:] = True  # positions 0-1 are left padding
    visual[1, 3:12] = True
    text[1, 12:] = True
    valid[2, :12] = True  # positions 12-15 are right padding
    visual[2, 4:8] = True
    text[2, 8:12] = True
    last_query = np.array([15, 15, 11])
    grid_rows = np.full((BATCH, N_TOKENS), -1)
    grid_cols = np.full((BATCH, N_TOKENS), -1)
    cells = {0: [0, 1, 2, 3, 4, 5], 1: list(range(9)), 2: [8, 6, 4, 0]}  # sample 2: scattered, out of order
    for sample, sample_cells in cells.items():
        positions = np.flatnonzero(visual[sample])
        grid_rows[sample, positions] = np.array(sample_cells) // GRID[1]
        grid_cols[sample, positions] = np.array(sample_cells) % GRID[1]
    return valid, visual, text, last_query, grid_rows, grid_cols


VALID, VISUAL, TEXT, LAST_QUERY, GRID_ROWS, GRID_COLS = _layout()


def _random_attention(seed, layers=None):
    """Causal softmax attention with padded keys masked; rows of padded queries are NaN."""
    rng = np.random.default_rng(seed)
    shape = ((layers,) if layers else ()) + (BATCH, HEADS, N_TOKENS, N_TOKENS)
    scores = rng.normal(size=shape) * 2
    allowed = np.tril(np.ones((N_TOKENS, N_TOKENS), bool))[None, None] & VALID[:, None, None, :]
    scores = np.where(allowed, scores, -np.inf)
    with np.errstate(invalid="ignore"):
        attn = np.exp(scores - scores.max(-1, keepdims=True))
        attn = attn / attn.sum(-1, keepdims=True)
    attn = np.where(VALID[:, None, :, None], attn, np.nan)
    return attn.astype(np.float32)


ATTN = _random_attention(0)


def _ref_mass(attn, query_mask, key_mask):
    out = np.zeros((BATCH, HEADS))
    for b in range(BATCH):
        queries = np.flatnonzero(query_mask[b])
        keys = np.flatnonzero(key_mask[b])
        for h in range(HEADS):
            per_query = [sum(attn[b, h, i, j] for j in keys) for i in queries]
            out[b, h] = np.mean(per_query) if queries.size else 0.0
    return out


def _ref_block_mean_per_head(attn, query_mask, key_mask):
    out = np.zeros((BATCH, HEADS))
    for b in range(BATCH):
        pairs = [(i, j) for i in np.flatnonzero(query_mask[b]) for j in np.flatnonzero(key_mask[b])]
        for h in range(HEADS):
            out[b, h] = np.mean([attn[b, h, i, j] for i, j in pairs]) if pairs else 0.0
    return out


def _ref_last_query_map(attn, query_index, visual_mask):
    out = np.zeros((BATCH, N_TOKENS))
    for b in range(BATCH):
        row = attn[b, :, query_index[b], :].astype(np.float64).mean(0)
        keys = np.flatnonzero(visual_mask[b])
        total = row[keys].sum()
        if keys.size and total > 0:
            out[b, keys] = row[keys] / total
    return out


def _ref_concentration(weights, mask, eps=1e-9):
    sliced = np.asarray(weights, np.float64)[np.asarray(mask, bool)]
    if sliced.size < 2 or sliced.sum() == 0:
        return 0.0
    a = sliced / sliced.sum()
    return 1 - (-np.sum(a * np.log(a + eps))) / np.log(sliced.size)


# ------------------------------------------------------------------------------------------------------------------


def test_visual_mass_all_queries_and_last_query():
    np.testing.assert_allclose(am.visual_mass(ATTN, TEXT, VISUAL), _ref_mass(ATTN, TEXT, VISUAL), **TOL)
    last_only = np.zeros_like(TEXT)
    last_only[np.arange(BATCH), LAST_QUERY] = True
    np.testing.assert_allclose(am.visual_mass(ATTN, last_only, VISUAL), _ref_mass(ATTN, last_only, VISUAL), **TOL)
    # the one-query mask variant agrees with region_mass at that query
    np.testing.assert_allclose(am.visual_mass(ATTN, last_only, VISUAL), am.region_mass(ATTN, LAST_QUERY, VISUAL), **TOL)


def test_block_means_and_visual_fraction():
    per_head = _ref_block_mean_per_head(ATTN, TEXT, VISUAL)
    np.testing.assert_allclose(am.block_mean_per_head(ATTN, TEXT, VISUAL), per_head, **TOL)
    np.testing.assert_allclose(am.block_mean(ATTN, TEXT, VISUAL), per_head.mean(1), **TOL)

    m_v = _ref_block_mean_per_head(ATTN, TEXT, VISUAL)
    m_t = _ref_block_mean_per_head(ATTN, TEXT, TEXT)
    np.testing.assert_allclose(am.visual_fraction_per_head(ATTN, TEXT, VISUAL, TEXT), m_v / (m_v + m_t), **TOL)
    canonical = m_v.mean(1) / (m_v.mean(1) + m_t.mean(1))  # heads averaged before the ratio
    np.testing.assert_allclose(am.visual_fraction(ATTN, TEXT, VISUAL, TEXT), canonical, **TOL)


def test_last_query_map_region_mass_and_grid():
    token_map = np.asarray(am.last_query_visual_map(ATTN, LAST_QUERY, VISUAL))
    np.testing.assert_allclose(token_map, _ref_last_query_map(ATTN, LAST_QUERY, VISUAL), **TOL)
    np.testing.assert_allclose(token_map.sum(1), 1.0, **TOL)

    region = VISUAL & (np.arange(N_TOKENS) % 2 == 0)
    expected = np.array(
        [[ATTN[b, h, LAST_QUERY[b], region[b]].sum() for h in range(HEADS)] for b in range(BATCH)]
    )
    np.testing.assert_allclose(am.region_mass(ATTN, LAST_QUERY, region), expected, **TOL)

    grid = np.asarray(am.visual_map_to_grid(token_map, GRID_ROWS, GRID_COLS, GRID))
    expected_grid = np.zeros((BATCH,) + GRID)
    for b in range(BATCH):
        for k in range(N_TOKENS):
            if GRID_ROWS[b, k] >= 0:
                expected_grid[b, GRID_ROWS[b, k], GRID_COLS[b, k]] += token_map[b, k]
    np.testing.assert_allclose(grid, expected_grid, **TOL)
    np.testing.assert_allclose(am.grid_to_visual_map(grid, GRID_ROWS, GRID_COLS), token_map, **TOL)


def test_entropy_concentration_and_spatial_entropy():
    rng = np.random.default_rng(1)
    weights = rng.random((BATCH, HEADS, N_TOKENS)).astype(np.float32)
    expected = np.array([[_ref_concentration(weights[b, h], VISUAL[b]) for h in range(HEADS)] for b in range(BATCH)])
    np.testing.assert_allclose(am.concentration(weights, VISUAL), expected, **TOL)  # per head, mask broadcast
    np.testing.assert_allclose(
        am.concentration(weights[:, 0], VISUAL), [_ref_concentration(weights[b, 0], VISUAL[b]) for b in range(BATCH)],
        **TOL,
    )

    one_hot = np.zeros((BATCH, N_TOKENS), np.float32)
    uniform = np.zeros((BATCH, N_TOKENS), np.float32)
    for b in range(BATCH):
        visual_positions = np.flatnonzero(VISUAL[b])
        one_hot[b, visual_positions[1]] = 0.7
        uniform[b, visual_positions] = 0.2
    np.testing.assert_allclose(am.concentration(one_hot, VISUAL), 1.0, **TOL)
    np.testing.assert_allclose(am.concentration(uniform, VISUAL), 0.0, **TOL)

    probabilities = weights[:, 0] / weights[:, 0].sum(-1, keepdims=True)
    expected_entropy = [
        -sum(p * math.log(p + 1e-9) for p, m in zip(probabilities[b], VISUAL[b]) if m) for b in range(BATCH)
    ]
    np.testing.assert_allclose(am.entropy(probabilities, VISUAL), expected_entropy, **TOL)

    maps = rng.random((BATCH,) + GRID).astype(np.float32)
    maps /= maps.sum((1, 2), keepdims=True)
    expected_spatial = [-sum(m * math.log(m + 1e-9) for m in maps[b].ravel()) for b in range(BATCH)]
    np.testing.assert_allclose(am.spatial_entropy(maps), expected_spatial, **TOL)
    token_map = am.last_query_visual_map(ATTN, LAST_QUERY, VISUAL)
    grid = am.visual_map_to_grid(token_map, GRID_ROWS, GRID_COLS, GRID)
    np.testing.assert_allclose(am.spatial_entropy(token_map, axis=-1), am.spatial_entropy(grid), **TOL)


def _ref_components(cells, diagonal):
    """Connected components by flood fill."""
    seen = np.zeros_like(cells)
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)] + ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if diagonal else [])
    count = 0
    for start in zip(*np.nonzero(cells)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            r, c = stack.pop()
            for dr, dc in steps:
                nr, nc = r + dr, c + dc
                if 0 <= nr < cells.shape[0] and 0 <= nc < cells.shape[1] and cells[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
    return count


def test_top_fraction_clusters():
    rng = np.random.default_rng(2)
    maps = rng.random((6, 7, 9))  # distinct values: no ties
    n_top = math.ceil(0.3 * 63)
    for connectivity in (4, 8):
        expected = []
        for grid in maps:
            threshold = np.sort(grid.ravel())[::-1][n_top - 1]
            expected.append(_ref_components(grid >= threshold, diagonal=connectivity == 8))
        np.testing.assert_array_equal(am.top_fraction_clusters(maps, 0.3, connectivity), expected)
    assert am.top_fraction_mask(maps, 0.3).sum((1, 2)).tolist() == [n_top] * 6

    diagonal = np.array([[5.0, 0, 0], [0, 5, 0], [0, 0, 5]])  # top 3 of 9 = the diagonal
    assert am.top_fraction_clusters(diagonal) == 3
    assert am.top_fraction_clusters(diagonal, connectivity=8) == 1
    flat = np.ones((3, 3))  # ties: the first ceil(2.7) = 3 cells in row-major order, one row
    assert am.top_fraction_mask(flat).tolist() == [[True] * 3, [False] * 3, [False] * 3]
    assert am.top_fraction_clusters(flat) == 1
    with pytest.raises(ValueError, match="connectivity"):
        am.top_fraction_clusters(flat, connectivity=6)


def test_box_to_token_mask():
    image_hw = (336, 336)  # 3 x 3 cells of 112 px: centres at 56, 168, 280
    expected_cells = {"centre": {(0, 0)}, "overlap": {(0, 0), (0, 1), (1, 0), (1, 1)}}
    for mode, cells in expected_cells.items():
        mask = am.box_to_token_mask([0, 0, 150, 150], image_hw, GRID_ROWS, GRID_COLS, GRID, mode=mode)
        expected = np.array(
            [[(GRID_ROWS[b, k], GRID_COLS[b, k]) in cells for k in range(N_TOKENS)] for b in range(BATCH)]
        )
        np.testing.assert_array_equal(mask, expected)
    assert not am.box_to_token_mask([0, 0, 150, 150], image_hw, GRID_ROWS, GRID_COLS, GRID)[~VISUAL].any()

    per_sample_boxes = [[-50, -50, 60, 60], [200, 150, 400, 336], [0, 0, 30, 30]]  # clipped / clipped / tiny
    mask = am.box_to_token_mask(per_sample_boxes, image_hw, GRID_ROWS, GRID_COLS, GRID)
    selected = [{(GRID_ROWS[b, k], GRID_COLS[b, k]) for k in np.flatnonzero(mask[b])} for b in range(BATCH)]
    assert selected == [{(0, 0)}, {(1, 2), (2, 2)}, set()]  # a box smaller than a patch may hold no centre
    unbatched = am.box_to_token_mask([0, 0, 336, 336], image_hw, GRID_ROWS[1], GRID_COLS[1], GRID)
    np.testing.assert_array_equal(unbatched, VISUAL[1])

    for box, message in [
        ([10, 10, 10, 20], "empty"),
        ([30, 40, 20, 50], "empty"),
        ([400, 0, 500, 100], "outside"),
        ([-100, -100, -10, -10], "outside"),
        ([0, np.nan, 10, 10], "non-finite"),
    ]:
        with pytest.raises(ValueError, match=message):
            am.box_to_token_mask(box, image_hw, GRID_ROWS, GRID_COLS, GRID)
    with pytest.raises(ValueError, match="mode"):
        am.box_to_token_mask([0, 0, 10, 10], image_hw, GRID_ROWS, GRID_COLS, GRID, mode="inside")


def test_hellinger_contrastive_and_head_score():
    rng = np.random.default_rng(3)
    p = rng.random((BATCH, N_TOKENS)).astype(np.float32)
    q = rng.random((BATCH, N_TOKENS)).astype(np.float32)
    p /= p.sum(1, keepdims=True)
    q /= q.sum(1, keepdims=True)
    expected = [
        math.sqrt(sum((math.sqrt(a) - math.sqrt(c)) ** 2 for a, c in zip(p[b], q[b]))) / math.sqrt(2)
        for b in range(BATCH)
    ]
    np.testing.assert_allclose(am.hellinger(p, q), expected, **TOL)
    np.testing.assert_allclose(am.hellinger(p, p), 0.0, atol=1e-6)
    disjoint_p, disjoint_q = np.array([0.5, 0.5, 0, 0]), np.array([0, 0, 0.25, 0.75])
    np.testing.assert_allclose(am.hellinger(disjoint_p, disjoint_q), 1.0, **TOL)
    np.testing.assert_allclose(am.contrastive_attention(p, q), np.abs(p - q), **TOL)

    weight = rng.random((5, HEADS)).astype(np.float32)
    conc = rng.random((5, HEADS)).astype(np.float32)
    layers = np.arange(5)[:, None]
    expected_score = weight * conc / np.log(layers + math.e)
    np.testing.assert_allclose(am.head_detection_score(weight, conc, layers), expected_score, **TOL)
    np.testing.assert_allclose(
        am.head_detection_score(weight, conc, layers, layer_weight=lambda l: 1.0 / (l + 1)),
        weight * conc / (layers + 1),
        **TOL,
    )


def test_empty_visual_set_gives_documented_zeros():
    no_visual = VISUAL.copy()
    no_visual[1] = False
    no_text = TEXT.copy()
    no_text[2] = False
    results = {
        "mass": am.visual_mass(ATTN, TEXT, no_visual)[1],
        "mass_no_queries": am.visual_mass(ATTN, no_text, VISUAL)[2],
        "block": am.block_mean(ATTN, TEXT, no_visual)[1],
        "fraction": am.visual_fraction(ATTN, TEXT, no_visual, TEXT)[1],
        "fraction_per_head": am.visual_fraction_per_head(ATTN, no_text, VISUAL, no_text)[2],
        "map": am.last_query_visual_map(ATTN, LAST_QUERY, no_visual)[1],
        "region": am.region_mass(ATTN, LAST_QUERY, no_visual)[1],
        "concentration": am.concentration(np.ones((BATCH, N_TOKENS)), no_visual)[1],
        "concentration_one_entry": am.concentration(np.ones((1, 3)), np.array([[False, True, False]])),
    }
    for name, value in results.items():
        value = np.asarray(value)
        assert np.all(np.isfinite(value)), name
        np.testing.assert_array_equal(value, 0.0, err_msg=name)
    # the other samples are unaffected
    np.testing.assert_allclose(
        np.asarray(am.visual_mass(ATTN, TEXT, no_visual))[[0, 2]], _ref_mass(ATTN, TEXT, VISUAL)[[0, 2]], **TOL
    )


def test_jit_vmap_and_scan_match_eager():
    jitted_cases = [
        (am.visual_mass, (ATTN, TEXT, VISUAL)),
        (am.block_mean, (ATTN, TEXT, VISUAL)),
        (am.visual_fraction, (ATTN, TEXT, VISUAL, TEXT)),
        (am.visual_fraction_per_head, (ATTN, TEXT, VISUAL, TEXT)),
        (am.last_query_visual_map, (ATTN, LAST_QUERY, VISUAL)),
        (am.region_mass, (ATTN, LAST_QUERY, VISUAL)),
        (am.concentration, (ATTN[:, :, 5, :], VISUAL)),
        (am.hellinger, (ATTN[:, 0, 8, :], ATTN[:, 1, 8, :])),
    ]
    for function, args in jitted_cases:
        np.testing.assert_allclose(jax.jit(function)(*args), function(*args), **TOL, err_msg=function.__name__)
    to_grid = jax.jit(am.visual_map_to_grid, static_argnums=3)
    token_map = am.last_query_visual_map(ATTN, LAST_QUERY, VISUAL)
    np.testing.assert_allclose(
        to_grid(token_map, GRID_ROWS, GRID_COLS, GRID), am.visual_map_to_grid(token_map, GRID_ROWS, GRID_COLS, GRID)
    )

    layered = _random_attention(4, layers=LAYERS)
    per_layer = np.stack([am.visual_fraction(layered[l], TEXT, VISUAL, TEXT) for l in range(LAYERS)])
    vmapped = jax.vmap(am.visual_fraction, in_axes=(0, None, None, None))(layered, TEXT, VISUAL, TEXT)
    np.testing.assert_allclose(vmapped, per_layer, **TOL)

    def step(carry, layer_attn):  # as inside a scanned forward pass, one layer at a time
        token_map = am.last_query_visual_map(layer_attn, LAST_QUERY, VISUAL)
        concentration = am.concentration(token_map, VISUAL)
        return carry, (am.visual_fraction(layer_attn, TEXT, VISUAL, TEXT), concentration)

    _, (fractions, concentrations) = jax.jit(lambda a: jax.lax.scan(step, 0, a))(jnp.asarray(layered))
    np.testing.assert_allclose(fractions, per_layer, **TOL)
    expected_conc = [
        [_ref_concentration(_ref_last_query_map(layered[l], LAST_QUERY, VISUAL)[b], VISUAL[b]) for b in range(BATCH)]
        for l in range(LAYERS)
    ]
    np.testing.assert_allclose(concentrations, expected_conc, **TOL)
