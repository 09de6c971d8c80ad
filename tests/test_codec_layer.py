"""The codec layer (aquakv.kv.codec and its codecs) works on plain tensors and never imports transformers: what a
paged-attention backend will call."""
import subprocess
import sys

import pytest
import torch

CODEC_LAYER = ("aquakv.kv.codec", "aquakv.kv.aqua_codec", "aquakv.kv.kivi", "aquakv.kv.predictors",
               "aquakv.kv.predictors_file", "aquakv.kv.local_layers")


def test_importing_the_codec_layer_imports_no_transformers():
    """In a fresh interpreter (this one has transformers loaded already)."""
    code = ("import sys\n"
            f"for name in {CODEC_LAYER!r}:\n"
            "    __import__(name)\n"
            "loaded = sorted(m for m in sys.modules if m == 'transformers' or m.startswith('transformers.'))\n"
            "print(len(loaded), loaded[:3])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("0 "), out.stdout


def _codecs():
    from aquakv.kv.aqua_codec import AquaKVCodec
    from aquakv.kv.kivi import KiviCodec
    from aquakv.kv.predictor_settings import AquaKVSettings
    from aquakv.kv.predictors import AquaKVPredictors

    info = {"name_or_path": "plain", "model_type": "llama", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16,
            "kv_width": 32, "aquakv_version": "test"}
    zeros = AquaKVPredictors([None, None], [None, None], AquaKVSettings(2, 2, 16, 0, 4), info)
    return {"higgs": AquaKVCodec(zeros), "kivi": KiviCodec(2, group_size=8), "kivi-pre-rope": KiviCodec(4, 8, True)}


@pytest.mark.parametrize("name", ["higgs", "kivi", "kivi-pre-rope"])
@pytest.mark.parametrize("seed", range(3))
def test_decode_of_any_range_is_the_encoded_reconstruction(name, seed):
    """encode -> (store, reconstruction); decode of [start, stop) into a caller's buffer gives that reconstruction's
    tokens (exact for the composed path: the same dequantization; the fused op's float order: 1e-5), and chain_out
    receives it; appended runs read as one."""
    codec = _codecs()[name]
    gen = torch.Generator().manual_seed(seed)
    runs = [torch.randn(2, 2, t, 16, generator=gen) for t in (24, 17)]
    store, hats = None, []
    for x in runs:
        chunk, k_hat, v_hat = codec.encode(1, x, 2 * x, None)
        store = codec.append(store, chunk)
        hats.append((k_hat, v_hat))
    k_ref, v_ref = (torch.cat([h[i] for h in hats], 2) for i in (0, 1))
    assert codec.num_tokens(store) == 41 and codec.nbytes(store) > 0
    start, stop = int(torch.randint(0, 20, (1,), generator=gen)), int(torch.randint(21, 42, (1,), generator=gen))
    out = (torch.empty(2, 2, stop - start, 16), torch.empty(2, 2, stop - start, 16))
    chain_out = (torch.empty(2, 2, stop - start, 16), torch.empty(2, 2, stop - start, 16))
    keys, values = codec.decode(1, store, None, start=start, stop=stop, chain_out=chain_out, out=out)
    assert keys is out[0] and values is out[1]
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys, k_ref[:, :, start:stop], **tol)
    torch.testing.assert_close(values, v_ref[:, :, start:stop], **tol)
    torch.testing.assert_close(chain_out[0], k_ref[:, :, start:stop], **tol)
    whole = codec.decode(1, store, None)
    torch.testing.assert_close(whole[0], k_ref, **tol)
