"""benchmarks/comfy_bench.py's peer row for an installed Spectrum ComfyUI port, with small fake ports
written into a temporary custom-nodes folder and loaded by ComfyUI's own loader (tiny Wan, random weights)."""
import sys
import textwrap

import pytest

import comfy_env

pytestmark = pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH")

STEPS = 4

def _patch_node(name: str, body: str, inputs: str = '{"required": {"model": ("MODEL",)}}') -> str:
    """Source of a V1 MODEL -> MODEL node class whose `patch(self, model, **inputs)` runs `body`."""
    return (f"class {name}:\n    @classmethod\n    def INPUT_TYPES(cls):\n        return {inputs}\n"
            f"    RETURN_TYPES = ('MODEL',)\n    FUNCTION = 'patch'\n    def patch(self, model, **inputs):\n"
            + textwrap.indent(textwrap.dedent(body), " " * 8) + "\n")


# A port that reuses the model's output on every other call (so half the block work), records the
# inputs its node was called with, and keeps a second MODEL patch node without Spectrum in its name.
REUSING_PORT = "CALLS = []\n" + _patch_node("UnrelatedPatch", "raise AssertionError('prefer the Spectrum node')") + \
    _patch_node("FakeSpectrumPatch", """
        CALLS.append(inputs)
        m = model.clone()
        last = {}
        def reuse_every_other(apply_model, args):
            last["n"] = last.get("n", 0) + 1
            if last["n"] % 2 == 0 and "out" in last:
                return last["out"]
            last["out"] = apply_model(args["input"], args["timestep"], **args["c"])
            return last["out"]
        m.set_model_unet_function_wrapper(reuse_every_other)
        return (m,)
    """, inputs='{"required": {"model": ("MODEL",), "steps": ("INT", {"default": 30}), '
                '"blend": ("FLOAT", {"default": 0.25}), "mode": (["chebyshev", "taylor"],)}, '
                '"optional": {"verbose": ("BOOLEAN", {"default": False})}}') + """
class LatentThing:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"

NODE_CLASS_MAPPINGS = {"UnrelatedPatchT": UnrelatedPatch, "LatentThingT": LatentThing,
                       "FakeSpectrumPatchT": FakeSpectrumPatch}
"""

RAISING_PORT = _patch_node("RaisingSpectrumPatch", "raise RuntimeError('needs a model with t_embedder and final_layer')") \
    + "NODE_CLASS_MAPPINGS = {'RaisingSpectrumPatchT': RaisingSpectrumPatch}\n"

# Patches the MODEL it is given instead of a clone: every later run of the base model is scaled.
MUTATING_PORT = _patch_node("MutatingSpectrumPatch", """
    model.set_model_unet_function_wrapper(
        lambda apply_model, a: apply_model(a["input"], a["timestep"], **a["c"]) * 1.05)
    return (model,)
""") + "NODE_CLASS_MAPPINGS = {'MutatingSpectrumPatchT': MutatingSpectrumPatch}\n"


@pytest.fixture(scope="module")
def bench():
    comfy_env.load_comfy()
    comfy_env.load_pack()
    from benchmarks import comfy_bench
    return comfy_bench


@pytest.fixture(scope="module")
def full(bench):
    """Full compute of the tiny Wan, as bench_family records it before the port rows."""
    out, wall, calls = bench.timed_sample(bench.make_base("wan"), "wan", STEPS)
    return {"out": out, "wall": wall, "blocks": calls}


@pytest.fixture
def custom_nodes(tmp_path, monkeypatch):
    """An empty custom-nodes folder that is the only one ComfyUI searches during the test."""
    import folder_paths
    root = tmp_path / "custom_nodes"
    root.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "custom_nodes", ([], set()))
    return root


def _install(root, folder, source):
    (root / folder).mkdir()
    (root / folder / "__init__.py").write_text(source)


def test_no_port_installed_is_one_line_and_no_row(bench, custom_nodes):
    _install(custom_nodes, "SomeOtherPack", "NODE_CLASS_MAPPINGS = {}\n")     # not a Spectrum port
    line, ports = bench.find_ports([str(custom_nodes)])
    assert ports == []
    assert line.startswith("No Spectrum ComfyUI port installed in") and str(custom_nodes) in line
    assert "\n" not in line


def test_an_installed_port_is_found_called_with_its_defaults_and_counted(bench, full, custom_nodes):
    _install(custom_nodes, "ComfyUI-Spectrum-Fake", REUSING_PORT)
    line, ports = bench.find_ports([str(custom_nodes)])
    assert [(p.folder, p.node_id) for p in ports] == [("ComfyUI-Spectrum-Fake", "FakeSpectrumPatchT")]
    assert "ComfyUI-Spectrum-Fake" in line

    row = bench.port_row(ports[0], "wan", STEPS, full)
    assert sys.modules[ports[0].node_cls.__module__].CALLS == [{"steps": STEPS, "blend": 0.25, "mode": "chebyshev", "verbose": False}]
    assert row["method"] == "ComfyUI-Spectrum-Fake (installed port, its defaults)"
    assert row["compute"] == pytest.approx(2.0)          # every other model call reused: half the block calls
    assert 0 < row["rel"] < 10 and row["psnr"] < 200     # reuse moved the result, and it was measured
    assert "base model unchanged" in row["note"] and "failed" not in row["note"]
    table = "\n".join(bench.table("wan", STEPS, [row]))
    assert "| ComfyUI-Spectrum-Fake (installed port, its defaults) | 2.00× |" in table


def test_a_port_that_raises_gets_a_failure_row(bench, full, custom_nodes):
    _install(custom_nodes, "spectrum_raising", RAISING_PORT)
    _, ports = bench.find_ports([str(custom_nodes)])
    row = bench.port_row(ports[0], "wan", STEPS, full)
    assert row["compute"] is None and row["rel"] is None
    assert row["note"].startswith("applying failed: RuntimeError: needs a model with t_embedder")
    assert "base model unchanged" in row["note"]
    assert "| — | — | — | — | applying failed" in "\n".join(bench.table("wan", STEPS, [row]))


def test_a_port_that_patches_its_input_model_in_place_is_flagged(bench, full, custom_nodes):
    _install(custom_nodes, "Spectrum-InPlace", MUTATING_PORT)
    _, ports = bench.find_ports([str(custom_nodes)])
    row = bench.port_row(ports[0], "wan", STEPS, full)
    assert row["compute"] == pytest.approx(1.0) and row["rel"] > 0
    assert "changes the base model in place" in row["note"]


def test_a_port_input_without_a_default_is_named(bench, custom_nodes):
    from benchmarks import comfy_ports
    node = type("NeedsClip", (), {"INPUT_TYPES": classmethod(lambda cls: {"required": {
        "model": ("MODEL",), "clip": ("CLIP",)}}), "RETURN_TYPES": ("MODEL",), "FUNCTION": "patch"})
    with pytest.raises(ValueError, match="'clip' \\(CLIP\\) has no default"):
        comfy_ports.default_inputs(node, object(), STEPS)
