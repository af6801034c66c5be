"""Passes that stack: the lossless codec on integer codes (container version 5, single codes or pairs; version 4
still read), the ``dfloat11`` pass on the output of every pass it may follow (bit-identical outputs, also after
save + load; deltas stay deltas), and the pair rule that refuses the others when a recipe is read."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import modelpress
from modelpress.artifact import load_artifact, write_artifact
from modelpress.errors import CorruptData, UserError
from modelpress.kernels import entropy as E
from modelpress.kernels import entropy_cpu
from modelpress.passes import get_pass, pass_registry
from modelpress.quant.coded import decode_packed, encode_codes
from modelpress.quant.gptq import rtn_quantize
from modelpress.quant.packed import packed_from_result
from modelpress.recipe import check_pass_order, parse_passes

sys.path.insert(0, str(Path(__file__).parent))
from test_diffusion_ptq import PROBE_T, PROBE_X, STEPS, TINY_PROMPTS  # noqa: E402

torch.set_num_threads(1)


def skewed_codes(bits: int, n: int, seed: int) -> np.ndarray:
    """Bell-shaped codes of ``bits`` bits (as quantized weights are) containing every value at least once."""
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    c = np.clip(np.round(rng.normal(top / 2, max(top / 6, 0.5), n)), 0, top).astype(np.uint8)
    c[: top + 1] = np.arange(top + 1, dtype=np.uint8)
    return rng.permutation(c)


# ---------------------------------------------------------------------------------------------------
# The codec on integer codes

def paired_codes(bits: int, n: int, seed: int) -> np.ndarray:
    """Codes whose neighbours depend on each other (pairs of one channel share a scale): the second of each
    pair is the first plus a small step, so pairs carry less information than two independent codes."""
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    first = skewed_codes(bits, -(-n // 2), seed)
    second = np.clip(first.astype(np.int64) + rng.integers(-1, 2, first.size), 0, top).astype(np.uint8)
    return np.stack([first, second], 1).reshape(-1)[:n]


def adversarial_codes(bits: int) -> dict[str, np.ndarray]:
    """All-equal codes (a one-symbol table), uniform random ones (nothing to gain), bell-shaped ones with every
    value, neighbour-dependent ones (pairs pay), each at odd counts where the last pair / group is part-filled."""
    rng = np.random.default_rng(bits)
    top = (1 << bits) - 1
    return {"one code": np.ones(1, np.uint8) * top, "all equal": np.full(1001, top, np.uint8),
            "uniform": rng.integers(0, top + 1, 2049).astype(np.uint8), "skewed": skewed_codes(bits, 4001, bits),
            "paired": paired_codes(bits, 4003, bits)}


@pytest.mark.parametrize("bits", range(1, 9))
def test_integer_codes_round_trip_bit_exact_on_adversarial_inputs(bits: int) -> None:
    from modelpress.kernels import bitpack
    from modelpress.quant.coded import codes_per_word_choices, group_codes

    for what, codes in adversarial_codes(bits).items():
        enc = encode_codes(codes, bits, lane_size=256)
        plan = E.validate(enc)
        k = plan.codes_per_word
        assert int(enc.header[1]) == E.INT_VERSION and plan.dtype == "uint8" and k in codes_per_word_choices(bits)
        # the smallest of the candidate encodings, side data included
        sizes = {j: entropy_cpu.encode(group_codes(codes, bits, j), "uint8", 256, 0, 14, codes_per_word=j).nbytes
                 for j in codes_per_word_choices(bits)}
        assert enc.nbytes == min(sizes.values()) and sizes[k] == enc.nbytes, what
        words = group_codes(codes, bits, k)
        ref = E.encode_reference(words, "uint8", 256, 0, 14, codes_per_word=k)
        assert all(np.array_equal(a, b) for a, b in zip(enc.arrays().values(), ref.arrays().values())), what
        assert np.array_equal(E.decode_reference(enc), words), what
        # the numba kernel (and bit packing) give the layer's packed stream bit for bit
        assert np.array_equal(decode_packed(enc, bits, codes.size, what), bitpack.pack_codes(codes, bits)), what
    assert codes_per_word_choices(8) == (1,) and codes_per_word_choices(4) == (1, 2)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pairs_are_chosen_where_neighbours_depend_and_beat_single_codes(bits: int) -> None:
    codes = paired_codes(bits, 40_001, 7)
    enc = encode_codes(codes, bits, lane_size=4096)
    assert E.validate(enc).codes_per_word >= 2
    single = entropy_cpu.encode(codes, "uint8", 4096, 0, 14, codes_per_word=1)
    assert enc.nbytes < single.nbytes
    counts = np.bincount(codes, minlength=256)
    assert int(enc.lane_nbytes.sum()) * 8 / codes.size < E.order0_entropy_bits(counts)  # below the order-0 bound


def test_float_tensors_keep_their_version_3_bytes() -> None:
    w = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    words = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert int(entropy_cpu.encode(words, "bfloat16", 1024).header[1]) == 3
    with pytest.raises(ValueError, match="integer codes, and only they"):
        E.assemble("bfloat16", 0, 16, 11, np.zeros(2048, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.uint8),
                   version=E.INT_VERSION)


def _with_header(enc: E.Encoded, field: int, value: int) -> E.Encoded:
    """``enc`` with ``header[field] = value`` and a recomputed header crc (a forged, not a damaged, header)."""
    h = enc.header.copy()
    h[field] = value
    h[11] = E._crc(h[:11], enc.codebook, enc.lane_nbytes)
    return E.Encoded(**{**enc.arrays(), "header": h})


def _corruptions(enc: E.Encoded) -> list[tuple[str, E.Encoded]]:
    out = []
    rng = np.random.default_rng(1)
    for field in E.FIELDS:
        a = getattr(enc, field)
        for _ in range(40):
            b = a.copy()
            i = int(rng.integers(b.size))
            b.view(np.uint8)[i * b.itemsize + int(rng.integers(b.itemsize))] ^= np.uint8(1 << int(rng.integers(8)))
            out.append((field, E.Encoded(**{**enc.arrays(), field: b})))
        out.append((f"{field} truncated", E.Encoded(**{**enc.arrays(), field: a[:-1]})))
    header = enc.header.copy()
    header[1] = 3  # an integer tensor claiming a version without integer codes
    out.append(("version 3", E.Encoded(**{**enc.arrays(), "header": header})))
    for k in (0, 3, 16):  # forged numbers of codes per word
        out.append((f"{k} codes per word", _with_header(enc, 10, k)))
    out.append(("single codes claimed", _with_header(enc, 10, 1)))  # then the word count is wrong
    out.append(("version 4 claimed", _with_header(enc, 1, 4)))      # version 4 has no codes per word
    return out


def test_corrupt_integer_containers_are_refused_before_any_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    codes = paired_codes(4, 50_001, 3)
    enc = encode_codes(codes, 4, lane_size=2048)
    assert E.validate(enc).codes_per_word == 2

    def no_kernel(*args: object) -> None:
        raise AssertionError("a kernel ran on corrupt data")

    monkeypatch.setattr(entropy_cpu, "decode_kernel", no_kernel)
    monkeypatch.setattr(entropy_cpu, "decode_kernel_serial", no_kernel)
    for what, bad in _corruptions(enc):
        with pytest.raises(CorruptData):
            decode_packed(bad, 4, codes.size, what)
    with pytest.raises(CorruptData, match="beyond 2 x 3 bits"):  # codes wider than the layer's bit width
        decode_packed(enc, 3, codes.size, "narrow")
    with pytest.raises(CorruptData, match="expects"):
        decode_packed(enc, 4, codes.size + 2, "count")
    with pytest.raises(CorruptData, match="expects"):  # 5-bit codes cannot come in pairs
        decode_packed(enc, 5, codes.size, "wide")


def test_a_last_word_with_codes_past_the_count_is_refused() -> None:
    from modelpress.quant.coded import group_codes

    codes = paired_codes(3, 1001, 5)
    words = group_codes(codes, 3, 2)
    words[-1] |= 0b101 << 3  # a code in the padding of the last pair
    enc = entropy_cpu.encode(words, "uint8", 256, 0, 14, codes_per_word=2)
    with pytest.raises(CorruptData, match="past the 1001"):
        decode_packed(enc, 3, codes.size, "tail")


# ---------------------------------------------------------------------------------------------------
# The packed format, coded

def test_packed_layer_codes_entropy_coded_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 128)
    torch.nn.init.normal_(lin.weight)  # bell-shaped, as trained weights are (uniform codes would not pay)
    mod = packed_from_result(rtn_quantize(lin.weight.detach(), 4, 0, True), lin, sym=True)
    x = torch.randn(3, 256)
    want, packed = mod(x), mod.qweight.clone()
    report = mod.entropy_code(lane_size=512)
    assert report["qweight"]["coded"] and report["qweight"]["coded_bytes"] < packed.numel()
    assert "qweight" not in mod.state_dict() and "qweight_ec_stream" in mod.state_dict()
    assert torch.equal(mod(x), want)
    model = torch.nn.Sequential(mod)
    handle = modelpress.model.ModelHandle(model, "encoder", "t", {"class": "Sequential"}, {})
    manifest = write_artifact(tmp_path / "a", handle)
    assert manifest["compressed_modules"][0]["coded"]["qweight"]["stream"] == mod.qweight_ec_stream.numel()
    again = type(mod).from_module_config(mod.module_config())
    again.prepare_coded(mod.coded_sizes())
    again.load_state_dict(mod.state_dict())
    assert torch.equal(again.qweight, packed) and torch.equal(again(x), want)
    bad = dict(mod.state_dict())
    bad["qweight_ec_stream"] = bad["qweight_ec_stream"].clone()
    bad["qweight_ec_stream"][5] ^= 1
    with pytest.raises(CorruptData):
        again.load_state_dict(bad)


def test_version_4_artifacts_still_load_bit_exactly(tmp_path: Path) -> None:
    """An artifact written before codes per word (container version 4: one code per symbol) loads: packed
    codes and outputs bit-identical."""
    from test_delta import _bert_pair

    from modelpress.kernels import bitpack
    from modelpress.model import example_inputs
    from modelpress.modules import set_submodule
    from modelpress.quant.coded import EntropyCodedCodes

    _, handle = _bert_pair()
    for name, m in list(handle.module.named_modules()):
        if isinstance(m, torch.nn.Linear) and ".encoder." in f".{name}":
            set_submodule(handle.module, name, packed_from_result(rtn_quantize(m.weight.detach(), 4, 0, True), m,
                                                                  sym=True))
    x = example_inputs(handle, batch=2, seq_len=12)
    layers = [m for m in handle.module.modules() if isinstance(m, EntropyCodedCodes)]
    packed = [m.qweight.clone() for m in layers]
    for m in layers:  # what modelpress wrote before version 5
        codes = bitpack.unpack_codes(m.qweight.numpy(), *m.code_buffers()["qweight"])
        old = E.encode_reference(codes, "uint8", 1024, 0, 14, version=4)
        m._set_encoding("qweight", {k: torch.from_numpy(a.copy()) for k, a in old.arrays().items()})
    with torch.no_grad():
        want = handle.canonical()(*x)
    write_artifact(tmp_path / "old", handle)
    loaded = load_artifact(tmp_path / "old")
    assert int(loaded.module.state_dict()[next(k for k in loaded.module.state_dict()
                                              if k.endswith("qweight_ec_header"))][1]) == 4
    again = [m for m in loaded.module.modules() if isinstance(m, EntropyCodedCodes)]
    assert len(again) == len(packed) and all(torch.equal(m.qweight, p) for m, p in zip(again, packed))
    with torch.no_grad():
        assert torch.equal(loaded.canonical()(*x), want)


# ---------------------------------------------------------------------------------------------------
# Every pair: composes (bit-identical when the second pass is lossless) or is refused when read

def test_every_pair_of_passes_composes_or_is_refused_in_one_line() -> None:
    names = sorted(pass_registry())
    for first in names:
        for second in names:
            a, b = get_pass(first), get_pass(second)
            try:
                check_pass_order([(first, a.Config.model_construct()), (second, b.Config.model_construct())], "r.yaml")
            except UserError as exc:
                msg = str(exc)
                assert "\n" not in msg and msg.startswith("r.yaml: passes[1]: ") and repr(first) in msg
                assert a.compresses and not b.follows_compression
            else:
                assert not a.compresses or b.follows_compression
    assert [n for n in names if get_pass(n).follows_compression] == ["dfloat11"]
    assert [n for n in names if not get_pass(n).compresses] == ["cast"]


def test_refusal_messages_name_the_pair_and_why() -> None:
    from test_delta import _bert_pair

    with pytest.raises(UserError, match=r"passes\[1\]: pass 'bitdelta' cannot follow 'ptq' \(passes\[0\]\)"):
        check_pass_order(parse_passes([{"type": "ptq"}, {"type": "bitdelta"}]), None)
    with pytest.raises(UserError, match=r"casts nothing; remove 'dtype'"):
        check_pass_order(parse_passes([{"type": "bitdelta"}, {"type": "dfloat11", "dtype": "bfloat16"}]), None)
    check_pass_order(parse_passes([{"type": "cast"}, {"type": "dfloat11", "dtype": "bfloat16"}]), None)
    check_pass_order(parse_passes([{"type": "bitdelta"}, {"type": "dfloat11", "cast": False}]), None)
    with pytest.raises(UserError, match="cannot follow 'dfloat11'"):
        modelpress.compress(_bert_pair()[1], [{"type": "dfloat11"}, {"type": "cast"}])


def wide_unet() -> "modelpress.model.ModelHandle":
    """The tiny test UNet's structure with layers wide enough (up to 32 x 64 x 3 x 3) that coding their codes
    pays for the side data (~130 bytes per tensor), and normally distributed weights."""
    import diffusers as d

    from modelpress.model import ModelHandle, describe_architecture

    torch.manual_seed(0)
    m = d.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                      norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8).eval()
    with torch.no_grad():  # bell-shaped weights, as trained ones are (a fresh init is uniform: nothing to gain)
        for p in m.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) * p.std())
    return ModelHandle(m, "unet", "wide", describe_architecture(m), {})


def test_dfloat11_after_ptq_is_bit_identical_and_smaller(tmp_path: Path) -> None:
    ptq = {"type": "ptq", "w_bits": 4, "a_bits": 8, "samples": 8, "steps": STEPS, "batch_size": 8}
    one = modelpress.compress(wide_unet(), [ptq], calibration=TINY_PROMPTS, keep_reference=False)
    # what `passes: [ptq, dfloat11]` runs second (ptq is deterministic: run once here, the pair through
    # compress() is tested on the delta passes)
    two = modelpress.compress(one.handle.copy(), [{"type": "dfloat11"}], keep_reference=False)
    log = two.log["dfloat11"]
    assert log["mode"] == "stacked" and log["integer_streams_coded"] > 0 and log["cast_from"] is None
    with torch.no_grad():
        want = one.model(PROBE_X, PROBE_T).sample
        assert torch.equal(two.model(PROBE_X, PROBE_T).sample, want)
    one.save(tmp_path / "one")
    two.save(tmp_path / "two")
    loaded = load_artifact(tmp_path / "two")
    with torch.no_grad():
        assert torch.equal(loaded.module(PROBE_X, PROBE_T).sample, want)
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("one", "two")]
    assert sizes[1] < sizes[0]
    before = dict(load_artifact(tmp_path / "one").module.state_dict())
    after = loaded.module.state_dict()
    assert all(after[k].dtype == t.dtype for k, t in before.items() if k in after)  # nothing cast


DELTA_FIRST = {"bitdelta": {"type": "bitdelta", "steps": 0},
               "delta_come": {"type": "delta_come", "quantizer": "rtn", "budget_bits": 4.0},
               "dare": {"type": "dare", "p": 0.9},
               "darex": {"type": "darex", "p": 0.9, "q_mode": "analytic", "samples": 4, "batch_size": 2,
                         "seq_len": 8}}


@pytest.mark.parametrize("first", sorted(DELTA_FIRST))
def test_deltas_stay_deltas_and_lossless_on_top_is_bit_identical(first: str, tmp_path: Path) -> None:
    from test_delta import _bert_pair

    from modelpress.model import example_inputs

    runs = {}
    for name, passes in (("one", [DELTA_FIRST[first]]), ("two", [DELTA_FIRST[first], {"type": "dfloat11"}])):
        bh, fh = _bert_pair()
        runs[name] = modelpress.compress(fh, passes, base=bh, calibration="random", keep_reference=False)
        runs[name].save(tmp_path / name)
    x = example_inputs(fh, batch=2, seq_len=12)
    with torch.no_grad():
        want = runs["one"].handle.canonical()(*x)
        assert torch.equal(runs["two"].handle.canonical()(*x), want)
        assert torch.equal(load_artifact(tmp_path / "two", base=bh).canonical()(*x), want)
    manifests = [modelpress.artifact.read_manifest(tmp_path / n) for n in ("one", "two")]
    assert manifests[0]["from_base"] == manifests[1]["from_base"]  # the base is never stored, never cast
    sizes = [(tmp_path / n / "model.safetensors").stat().st_size for n in ("one", "two")]
    assert sizes[1] <= sizes[0]
    log = runs["two"].log["dfloat11"]
    assert log["mode"] == "stacked" and log["cast_from"] is None
    if sizes[1] == sizes[0]:
        assert any("found nothing to code" in w for w in log["warnings"])


def test_stacked_recipe_validates_and_the_issues_example_is_refused_when_read(tmp_path: Path) -> None:
    from modelpress.recipe import load_recipes

    loaded = load_recipes(Path(__file__).parents[1] / "recipes" / "stacked.yaml")
    assert [[n for n, _ in r.passes] for r in loaded] == [["bitdelta", "dfloat11"], ["tfmq", "dfloat11"]]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: minilm-docs\nbase: minilm\npasses:\n  - {type: bitdelta, steps: 0}\n"
                      "  - {type: dfloat11, dtype: bfloat16}\n")
    with pytest.raises(UserError, match=r"r\.yaml: passes\[1\]: pass 'dfloat11' after 'bitdelta'"):
        load_recipes(recipe)


@pytest.mark.parametrize("bits", range(1, 9))
def test_numba_bit_packing_matches_the_torch_reference(bits: int) -> None:
    from modelpress.kernels import bitpack
    from modelpress.quant.primitives import pack_codes, unpack_codes

    for n in (0, 1, 7, 8, 9, 1001):
        codes = skewed_codes(bits, max(n, 1 << bits), n)[:n]
        packed = bitpack.pack_codes(codes, bits)
        assert np.array_equal(packed, pack_codes(torch.from_numpy(codes), bits).numpy())
        assert np.array_equal(bitpack.unpack_codes(packed, bits, n), codes)
        assert np.array_equal(unpack_codes(torch.from_numpy(packed), bits, n).numpy(), codes)
    with pytest.raises(ValueError, match="fewer than"):
        bitpack.unpack_codes(np.zeros(1, np.uint8), bits, 9)
