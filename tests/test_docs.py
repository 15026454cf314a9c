"""The docs are the repository's own and true: docs/sites.md's site tables list exactly the sites each family's
forward calls (and `vlmjax.hooks` accepts), with the shapes of their values; every "methods §N" citation resolves to a
section of docs/methods.md; nothing refers to files outside the repository."""

import re
from pathlib import Path
from typing import ClassVar

import jax
import numpy as np
import pytest
from PIL import Image

import vlmjax
from vlmjax.hooks import (BLOCK_SITES, GLOBAL_SITES, QFORMER_BLOCK_SITES, QFORMER_SITES, STACKS, VISION_BLOCK_SITES,
                          Hook, parse_site)
from vlmjax.processors import IMAGE_PROMPT
from vlmjax.testing.tiny import make_tiny_llava
from vlmjax.testing.tiny_instructblip import make_tiny_instructblip
from vlmjax.testing.tiny_llava_next import make_tiny_llava_next
from vlmjax.testing.tiny_paligemma import make_tiny_paligemma
from vlmjax.testing.tiny_qwen2_vl import make_tiny_qwen2_vl
from vlmjax.testing.tiny_qwen2_5_vl import make_tiny_qwen2_5_vl

ROOT = Path(__file__).parents[1]
SITES_MD = ROOT / "docs" / "sites.md"
METHODS_MD = ROOT / "docs" / "methods.md"
SOURCES = [p for d in ("vlmjax", "converters", "experiments", "benchmarks", "tests", "docs") for p in (ROOT / d).rglob("*")
           if p.suffix in (".py", ".md", ".json") and "builtin" not in p.parts] + [ROOT / "README.md"]
FAMILIES = {  # family: (builder, image placeholder, (height, width) of the two prompts' images)
    "llava": (make_tiny_llava, "<image>", ((56, 56), (40, 70))),
    "llava_next": (make_tiny_llava_next, "<image>", ((28, 56), (50, 30))),
    "qwen2_vl": (make_tiny_qwen2_vl, IMAGE_PROMPT, ((56, 56), (56, 84))),  # 16 + 24 patches, padded to 64
    "qwen2_5_vl": (make_tiny_qwen2_5_vl, IMAGE_PROMPT, ((56, 56), (56, 84))),
    "paligemma": (make_tiny_paligemma, "<image>", ((28, 28), (40, 30))),
    "instructblip": (make_tiny_instructblip, "", ((56, 56), (40, 70))),  # the processor puts the image first
}


def documented_sites() -> dict[str, dict[str, str]]:
    """{stack: {site: shape}} from the Sites section's tables ("" is the global stack, "qformer" the Q-Former
    table's global sites; "—" = not called)."""
    section = SITES_MD.read_text().split("## Sites", 1)[1].split("\n## ", 1)[0]
    table, out = None, {"blocks": {}, "vision.blocks": {}, "qformer.blocks": {}, "": {}, "qformer": {}}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith(("| Block site", "| Global site", "| Q-Former site")):
            table = cells[0]
        elif not line.startswith("| `") or table is None:
            table = table if line.startswith("|") else None
        else:
            for site in re.findall(r"`([^`]+)`", cells[0]):
                if table == "Block site":
                    for stack, shape in (("blocks", cells[2]), ("vision.blocks", cells[3])):
                        if shape != "—":
                            out[stack][site] = shape
                elif table == "Q-Former site":
                    out["qformer" if site.startswith("qformer.") else "qformer.blocks"][site] = cells[2]
                else:
                    out[""][site] = cells[2]
    return out


class SiteRecorder(Hook):
    """Records, while the forward is traced, the shape of the value at every site it is called at."""

    seen: ClassVar[dict] = {}

    def __call__(self, site, value, ctx):
        self.seen.setdefault(ctx.stack if ctx.layer is not None else "", {}).setdefault(site, set()).add(value.shape)
        return value, None


class VisionSiteRecorder(SiteRecorder):
    stack: ClassVar[str] = "vision.blocks"


class QFormerSiteRecorder(SiteRecorder):
    stack: ClassVar[str] = "qformer.blocks"


def symbols(model, batch) -> dict[str, int]:
    """The sizes the tables' shape symbols stand for, from the config and the prepared batch."""
    cfg, t, v = model.config, model.config.text, model.config.vision
    s = dict(B=batch["input_ids"].shape[0], N=batch["input_ids"].shape[1], D=t.hidden_size, H=t.num_heads,
             KVH=t.num_kv_heads, hd=t.head_dim, F=t.intermediate_size, V=t.vocab_size)
    if cfg.model_type in ("qwen2_vl", "qwen2_5_vl"):
        patches = batch["pixel_values"].shape[0]
        s.update(Dv=v.embed_dim, Iv=1, Tv=patches, Tf=patches, Df=v.embed_dim, Tp=patches // v.spatial_merge_size**2)
    elif cfg.model_type == "paligemma":
        s.update(Dv=v.hidden_size, Iv=batch["pixel_values"].shape[0], Tv=v.num_patches, Tf=v.num_patches,
                 Tp=v.num_patches, Df=v.hidden_size)
    elif cfg.model_type == "instructblip":
        q, queries = cfg.qformer, cfg.num_query_tokens
        s.update(Dv=v.hidden_size, Iv=batch["pixel_values"].shape[0], Tv=v.num_patches + 1, Tf=v.num_patches + 1,
                 Df=v.hidden_size, Tp=queries, Q=queries, Nq=queries + batch["qformer_input_ids"].shape[1],
                 Dq=q.hidden_size, Hq=q.num_heads, hdq=q.hidden_size // q.num_heads, Fq=q.intermediate_size)
    else:
        tv = v.num_patches + 1
        tf = tv - 1 if cfg.vision_feature_select_strategy == "default" else tv
        s.update(Dv=v.hidden_size, Iv=batch["pixel_values"].shape[0], Tv=tv, Tf=tf, Tp=tf,
                 Df=v.hidden_size * len(cfg.vision_feature_layers))
    return {**s, "Hv": v.num_heads, "hdv": s["Dv"] // v.num_heads, "Fv": v.intermediate_size}


def evaluate(shape: str, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[name.strip()] for name in shape.strip("[]").split(","))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def emitted(request, tmp_path_factory):
    make, placeholder, sizes = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    make(path)
    model, processor = vlmjax.load(path, progress=False), vlmjax.load_processor(path)
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((*hw, 3)) * 255).astype("uint8")) for hw in sizes]
    texts = [f"USER: {placeholder} what ?", f"USER: {placeholder} what is in the image ? ASSISTANT:"]
    batch, _ = model.prepare(dict(processor(images=images, text=texts, return_tensors="np", padding=True)))
    SiteRecorder.seen.clear()
    hooks = {"decoder": SiteRecorder(), "vision": VisionSiteRecorder(), "qformer": QFormerSiteRecorder()}
    jax.eval_shape(lambda params, b: model.forward(params, b, hooks), model.params, batch)
    return request.param, dict(SiteRecorder.seen), symbols(model, batch)


def test_the_site_tables_list_exactly_the_sites_the_forward_calls(emitted):
    family, seen, _ = emitted
    documented = documented_sites()
    expected = {"blocks": BLOCK_SITES, "vision.blocks": VISION_BLOCK_SITES, "": GLOBAL_SITES}
    if family == "instructblip":  # its Q-Former's stack and global sites, in a table of their own
        expected.update({"qformer.blocks": QFORMER_BLOCK_SITES, "": GLOBAL_SITES + QFORMER_SITES})
        documented[""].update(documented["qformer"])
    assert set(seen) == set(expected), family
    for stack, accepted in expected.items():
        assert set(seen[stack]) == set(documented[stack]) == set(accepted), (family, stack)
    assert STACKS == {"blocks": BLOCK_SITES, "vision.blocks": VISION_BLOCK_SITES, "qformer.blocks": QFORMER_BLOCK_SITES}


def test_the_site_tables_give_the_shapes_of_the_values(emitted):
    family, seen, sizes = emitted
    documented = documented_sites()
    documented[""].update(documented["qformer"])
    for stack, sites in seen.items():
        for site, shapes in sites.items():
            assert shapes == {evaluate(documented[stack][site], sizes)}, (family, stack, site, shapes)


def test_the_vision_tower_has_no_rotated_keys_site():
    with pytest.raises(vlmjax.VlmJaxError, match="Unknown site"):
        parse_site("vision.blocks.0.attn.rot_k", {"blocks": 2, "vision.blocks": 2})
    assert parse_site("blocks.1.attn.rot_k", {"blocks": 2, "vision.blocks": 2}) == ("blocks", 1, "attn.rot_k")


def test_every_methods_citation_names_a_section_of_methods_md():
    sections = set(re.findall(r"^## (\d+)\. ", METHODS_MD.read_text(), re.M))
    assert sections == {"1", "2", "3", "4", "5", "6"}
    cited = {(p.relative_to(ROOT).as_posix(), n) for p in SOURCES
             for n in re.findall(r"methods(?:\.md)? §(\d+)", p.read_text())}
    assert len(cited) >= 30  # the pattern finds the citations (35 file-section pairs when written)
    assert {c for c in cited if c[1] not in sections} == set()


def test_nothing_refers_to_files_outside_the_repository():
    outside = ("SPEC" + ".md", "../" + "shared", "seeds" + "/", "/" + "work/")
    assert [(p.relative_to(ROOT).as_posix(), o) for p in SOURCES for o in outside if o in p.read_text()] == []
