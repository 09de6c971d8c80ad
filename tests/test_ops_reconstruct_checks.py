"""aqua_reconstruct refuses bad arguments with messages naming the argument, the same on the fake kernel;
opcheck passes on valid calls (schema with its two mutated outputs, fake kernel, dispatch)."""
from __future__ import annotations

import aquakv.ops as ops
import pytest
import torch
from test_ops_reconstruct import ReconCase


def base() -> dict:
    """A valid call: B=2, T=3, H=2, D=64 (C=128), residual group 64 with a 16-point d=2 grid, one input,
    a per-head map (G=2), RoPE, fp16 out and a hat_out."""
    case = ReconCase(2, 3, 2, 64, 64, 2, 16, (128,), 2, None, True, torch.float16, "contiguous", "contiguous", seed=1)
    return case.tensors()


def with_up(args: dict) -> dict:
    g, c = 2, 128
    return dict(args, weights=[torch.randn(g, 64, 8)], up=torch.randn(g, 8, c // g))


def two_inputs(args: dict) -> dict:
    return dict(args, inputs=args["inputs"] * 2, weights=[args["weights"][0], torch.randn(2, 64, 64)])


def edit(**changes):
    """An override: each value is a tensor/value or a function of the base args."""
    def apply(args: dict) -> dict:
        out = dict(args)
        for key, value in changes.items():
            out[key] = value(args) if callable(value) else value
        return out
    return apply


BAD = [
    (edit(codes=lambda a: a["codes"][0]), "aqua_reconstruct: codes must be 3-D \\[B, T, bytes\\], got shape \\[3, 32\\]"),
    (edit(scales=lambda a: a["scales"][None]), "aqua_reconstruct: scales must be 3-D \\[B, T, C/group_size\\]"),
    (edit(codes=lambda a: a["codes"].to(torch.int8)), "aqua_reconstruct: codes must be torch.uint8, got torch.int8"),
    (edit(scales=lambda a: a["scales"].float()), "aqua_reconstruct: scales must be torch.float16, got torch.float32"),
    (edit(grid=lambda a: a["grid"].double()), "aqua_reconstruct: grid must be torch.float32, got torch.float64"),
    (edit(group_size=96), "aqua_reconstruct: group_size 96 must be a power of two in 2..32768"),
    (edit(signs=lambda a: a["signs"][:32]), "aqua_reconstruct: signs must be 1-D of length group_size = 64"),
    (edit(codes=lambda a: a["codes"][..., :-1]),
     "aqua_reconstruct: codes last dim 31 does not match 2 groups \\(scales last dim\\) \\* 16 bytes per group"),
    (edit(scales=lambda a: a["scales"][:, :2]), "aqua_reconstruct: codes .* and scales .* must have the same leading"),
    (edit(weights=[]), "aqua_reconstruct: got 1 inputs but 0 weights; each input needs its weight"),
    (edit(inputs=lambda a: [a["inputs"][0].half()]), "aqua_reconstruct: inputs\\[0\\] must be torch.float32 or "
     "torch.bfloat16 \\(the prediction's matmul dtype\\), got torch.float16"),
    (edit(inputs=lambda a: [a["inputs"][0].bfloat16()]), "aqua_reconstruct: weights\\[0\\] must be torch.bfloat16 "
     "like inputs\\[0\\] \\(inputs, weights and up share the prediction's matmul dtype\\), got torch.float32"),
    (lambda a: dict(two_inputs(a), inputs=[a["inputs"][0], a["inputs"][0].bfloat16()]),
     "aqua_reconstruct: inputs\\[1\\] must be torch.float32 like inputs\\[0\\]"),
    (edit(inputs=lambda a: [a["inputs"][0].bfloat16()], weights=lambda a: [a["weights"][0].bfloat16()]), None),
    (edit(inputs=lambda a: [a["inputs"][0][:, :2]]), "aqua_reconstruct: inputs\\[0\\] must be \\[B, T, C_i\\] with "
     "B, T = 2, 3 \\(scales' leading dims\\), got shape \\[2, 2, 128\\]"),
    (edit(weights=lambda a: [a["weights"][0].double()]), "aqua_reconstruct: weights\\[0\\] must be torch.float32 "
     "like inputs\\[0\\]"),
    (edit(weights=lambda a: [a["weights"][0][0]]), "aqua_reconstruct: weights\\[0\\] must be 3-D \\[G, C_i/G, M\\]"),
    (edit(weights=[torch.zeros(0, 64, 64)]), "aqua_reconstruct: weights\\[0\\] has G = 0 groups; G must be >= 1"),
    (edit(weights=[torch.zeros(3, 42, 42)]), "aqua_reconstruct: C = 128 channels \\(scales last dim \\* group_size\\) "
     "is not a multiple of G = 3 \\(weights' first dim\\)"),
    (edit(inputs=[torch.zeros(2, 3, 129)]), "aqua_reconstruct: inputs\\[0\\] last dim 129 is not a multiple of G = 2"),
    (edit(weights=[torch.zeros(2, 64, 32)]), "aqua_reconstruct: weights\\[0\\] must be \\[G, C_i/G, M\\] = "
     "\\[2, 64, 64\\] \\(M = C/G without up\\), got shape \\[2, 64, 32\\]"),
    (edit(weights=lambda a: [a["weights"][0], torch.zeros(4, 32, 32)], inputs=lambda a: a["inputs"] * 2),
     "aqua_reconstruct: weights\\[1\\] has 4 groups but weights\\[0\\] has 2; all weights must share G"),
    (lambda a: dict(with_up(a), up=torch.zeros(2, 8, 32)), "aqua_reconstruct: up must be \\[G, r, C/G\\] = "
     "\\[2, r, 64\\], got shape \\[2, 8, 32\\]"),
    (lambda a: dict(with_up(a), up=torch.zeros(2, 8, 64, dtype=torch.float16)), "aqua_reconstruct: up must be "
     "torch.float32 like inputs\\[0\\] \\(inputs, weights and up share the prediction's matmul dtype\\), got "
     "torch.float16"),
    (lambda a: dict(with_up(a), weights=[torch.zeros(2, 64, 64)]), "aqua_reconstruct: weights\\[0\\] must be "
     "\\[G, C_i/G, M\\] = \\[2, 64, 8\\] \\(M = the rank, up's second dim\\)"),
    (edit(inputs=[], weights=[], up=torch.zeros(1, 4, 128)), "aqua_reconstruct: up must be None when there are no "
     "inputs \\(an intercept-only predictor\\)"),
    (edit(bias=lambda a: a["bias"][:64]), "aqua_reconstruct: bias must be 1-D of length C = 128, got shape \\[64\\]"),
    (edit(bias=lambda a: a["bias"].half()), "aqua_reconstruct: bias must be torch.float32, got torch.float16"),
    (edit(sin=None), "aqua_reconstruct: cos and sin must be given together \\(both None: no RoPE\\)"),
    (edit(out=lambda a: a["out"].double()), "aqua_reconstruct: out must be float32, float16 or bfloat16, got "
     "torch.float64"),
    (edit(out=lambda a: a["out"][0]), "aqua_reconstruct: out must be 4-D \\[B, H, T, D\\], got shape \\[2, 3, 64\\]"),
    (edit(cos=lambda a: a["cos"].half()), "aqua_reconstruct: cos must be torch.float32, got torch.float16"),
    (edit(sin=lambda a: a["sin"].double()), "aqua_reconstruct: sin must be torch.float32, got torch.float64"),
    (edit(cos=lambda a: a["cos"][:1]), "aqua_reconstruct: cos must be \\[B, T, D\\] with B, T = 2, 3, got shape "
     "\\[1, 3, 64\\]"),
    (edit(sin=lambda a: a["sin"][..., :32]), "aqua_reconstruct: sin \\[2, 3, 32\\] must have cos' shape \\[2, 3, 64\\]"),
    (edit(cos=torch.zeros(2, 3, 63), sin=torch.zeros(2, 3, 63)), "aqua_reconstruct: head dim D = 63 \\(cos last dim\\) "
     "must be even and >= 2"),
    (edit(cos=torch.zeros(2, 3, 96), sin=torch.zeros(2, 3, 96)), "aqua_reconstruct: C = 128 channels is not a "
     "multiple of the head dim D = 96"),
    (edit(cos=None, sin=None, out=torch.zeros(2, 3, 3, 0)), "aqua_reconstruct: head dim D = 0 \\(out last dim\\); it "
     "must be >= 1"),
    (edit(cos=None, sin=None, out=torch.zeros(2, 2, 3, 48)), "aqua_reconstruct: C = 128 channels is not a multiple "
     "of the head dim D = 48"),
    (edit(out=lambda a: a["out"].transpose(1, 2)), "aqua_reconstruct: out must be \\[B, H, T, D\\] = \\[2, 2, 3, 64\\], "
     "got shape \\[2, 3, 2, 64\\]"),
    (edit(cos=None, sin=None, out=torch.zeros(2, 4, 3, 32)), None),  # valid: D = out's last dim without RoPE
    (edit(hat_out=lambda a: a["hat_out"].half()), "aqua_reconstruct: hat_out must be torch.float32, got torch.float16"),
    (edit(hat_out=lambda a: a["hat_out"][:, :2]), "aqua_reconstruct: hat_out must be \\[B, T, C\\] = \\[2, 3, 128\\], "
     "got shape \\[2, 2, 128\\]"),
]


@pytest.mark.parametrize("override,message", BAD, ids=lambda v: v[:70] if isinstance(v, str) else None)
def test_bad_arguments_are_refused_by_name(override, message: str | None) -> None:
    args = override(base())
    if message is None:
        ops.aqua_reconstruct(**args)
        return
    with pytest.raises(RuntimeError, match=message):
        ops.aqua_reconstruct(**args)


def to_meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    return [to_meta(v) for v in value] if isinstance(value, list) else value


@pytest.mark.parametrize("override,message", [b for b in BAD if b[1]], ids=lambda v: v[:70] if isinstance(v, str)
                         else None)
def test_fake_kernel_refuses_like_the_real_one(override, message: str) -> None:
    args = override(base())
    with pytest.raises(RuntimeError) as real:
        ops.aqua_reconstruct(**args)
    with pytest.raises(RuntimeError) as fake:
        ops.aqua_reconstruct(**{k: to_meta(v) for k, v in args.items()})
    assert str(fake.value) == str(real.value)


MIXABLE = ["codes", "scales", "grid", "signs", "bias", "cos", "sin", "out", "hat_out", "inputs", "weights"]


@pytest.mark.parametrize("name", MIXABLE)
def test_one_argument_on_meta_is_refused_by_name(name: str) -> None:
    args = base()
    args[name] = [to_meta(args[name][0])] if isinstance(args[name], list) else to_meta(args[name])
    shown = f"{name}[0]" if isinstance(args[name], list) else name
    with pytest.raises(RuntimeError, match="^aqua_reconstruct: .* is on (meta|cpu) but codes is on (cpu|meta); all "
                                           "tensors must be on the same device$") as failure:
        ops.aqua_reconstruct(**args)
    assert f"{shown} is on meta" in str(failure.value) or name == "codes"


def samples() -> list[tuple[str, dict]]:
    args = base()
    return [
        ("rope-hat", args),
        ("norope-nohat", dict(args, cos=None, sin=None, hat_out=None)),
        ("low-rank", with_up(args)),
        ("two-inputs", two_inputs(args)),
        ("intercept", dict(args, inputs=[], weights=[])),
        ("bf16-prediction", dict(with_up(args), inputs=[x.bfloat16() for x in args["inputs"]],
                                 weights=[w.bfloat16() for w in with_up(args)["weights"]],
                                 up=with_up(args)["up"].bfloat16())),
        ("slice-bf16", dict(args, out=torch.zeros(2, 2, 9, 64, dtype=torch.bfloat16)[:, :, 3:6])),
        ("empty", ReconCase(0, 3, 2, 16, 16, 2, 16, (32,), 1, None, True, torch.float32, "contiguous", "contiguous",
                            seed=2).tensors()),
    ]


SAMPLES = samples()


@pytest.mark.parametrize("name,args", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_opcheck(name: str, args: dict) -> None:
    order = ["codes", "scales", "grid", "signs", "group_size", "inputs", "weights", "up", "bias", "cos", "sin", "out",
             "hat_out"]
    torch.library.opcheck(torch.ops.aquakv.aqua_reconstruct.default, tuple(args[k] for k in order))


def test_compiled_call_matches_eager() -> None:
    # Traced without graph breaks (the fake kernel), functionalised, and the mutations land in the buffers.
    args = base()

    def run(out: torch.Tensor, hat: torch.Tensor) -> None:
        ops.aqua_reconstruct(**dict(args, out=out[:, :, 1:4], hat_out=hat))

    compiled = torch.compile(run, fullgraph=True, backend="inductor")
    got = torch.zeros(2, 2, 5, 64, dtype=torch.float16), torch.zeros_like(args["hat_out"])
    want = torch.zeros(2, 2, 5, 64, dtype=torch.float16), torch.zeros_like(args["hat_out"])
    compiled(*got)
    run(*want)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
