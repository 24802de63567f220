#!/usr/bin/env python
"""Multi-scale deformable attention, the MSDeformAttn pixel decoder and the Swin-T backbone on
CPU (fp32): the reference formulations against this project's fast paths and compiled kernels.

    python benchmarks/bench_pixel_decoder.py [--repeats 3] [--threads N] [--only op,decoder,swin]
                                             [--profile]

Settings: features of a 512x512 image for Swin-T (res2 96x128x128 ...
res5 768x16x16), 6 encoder layers, 256 channels, 8 heads, 4 points; inference = forward under
torch.no_grad() for one image, training = forward + backward for a batch of 2 images of
256x256. Reference of the official code on this machine: pixel decoder 1.41 s and Swin-T
backbone 0.57 s of a 2.4 s inference.

* op: ``ms_deform_attn_pytorch`` (the official grid_sample path) vs ``ms_deform_attn_fast`` and
  ``ms_deform_attn_cpu`` (the C++ kernels), at the encoder's shapes (every pixel of the three
  levels is a query).
* module: ``MSDeformAttn(impl="pytorch")`` vs ``impl="fast"`` (the fast module also computes
  sampling pixels and the softmax in its planar layout) and ``impl="cpu"`` (the kernels add the
  offsets and take the softmax themselves).
* decoder: ``MSDeformAttnPixelDecoder`` with each implementation.
* swin: ``D2SwinTransformer`` (fused scaled_dot_product_attention with bias + shift mask, one
  gather each way for pad / roll / window partition) vs the same weights run with the official
  formulation (explicit q k^T + bias + mask, softmax, @ v; pad, roll, partition and their
  inverses as separate copies). Outputs are compared.

Wall-clock medians over ``--repeats`` runs after one warm-up, and the process CPU time (all
threads), which is less sensitive to other processes on a shared machine.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec

from mask2former.modeling.backbone.swin import (
    D2SwinTransformer,
    shifted_window_attention_mask,
    window_partition,
    window_reverse,
)
from mask2former.modeling.pixel_decoder.deformable_attention import (
    MSDeformAttn,
    ms_deform_attn_cpu,
    ms_deform_attn_fast,
    ms_deform_attn_pytorch,
)
from mask2former.modeling.pixel_decoder.msdeformattn import MSDeformAttnPixelDecoder

SWIN_T_CHANNELS = {"res2": 96, "res3": 192, "res4": 384, "res5": 768}
OPS = {"pytorch": ms_deform_attn_pytorch, "fast": ms_deform_attn_fast, "cpu": ms_deform_attn_cpu}
IMPLS = tuple(OPS)
ENCODER_IN = ["res3", "res4", "res5"]


def measure(fn, repeats):
    """(median wall s, median process-CPU s) after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def report(name, timings, baseline=None):
    wall, cpu = timings
    line = f"  {name:<44s} wall {wall * 1e3:8.1f} ms   cpu {cpu * 1e3:8.1f} ms"
    if baseline is not None:
        line += f"   x{baseline[0] / wall:4.2f} wall, x{baseline[1] / cpu:4.2f} cpu"
    print(line, flush=True)


def swin_t_features(image_size, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(batch, c, image_size // (4 * 2**i), image_size // (4 * 2**i), generator=g)
        for i, (k, c) in enumerate(SWIN_T_CHANNELS.items())
    }


def encoder_shapes(image_size):
    return [(image_size // s, image_size // s) for s in (32, 16, 8)]  # lowest resolution first


# ------------------------------------------------------------------------------------------- op
def op_inputs(image_size, batch, requires_grad, seed=0):
    """Encoder-like inputs: every pixel of the levels is a query; its points lie around the
    reference point (the initial offset ring, radius 1..4 pixels, plus noise)."""
    g = torch.Generator().manual_seed(seed)
    shapes = encoder_shapes(image_size)
    heads, dim, points, levels = 8, 32, 4, len(shapes)
    s = sum(h * w for h, w in shapes)
    value = torch.randn(batch, s, heads, dim, generator=g)
    refs = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(
            (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
        )
        refs.append(torch.stack([xs, ys], -1).reshape(-1, 2))
    refs = torch.cat(refs)
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32).view(levels, 1, 2)
    offsets = 4 * torch.randn(batch, s, heads, levels, points, 2, generator=g)
    locations = refs.view(1, s, 1, 1, 1, 2) + offsets / size
    weights = torch.softmax(torch.randn(batch, s, heads, levels * points, generator=g), -1)
    weights = weights.view(batch, s, heads, levels, points)
    tensors = [value, locations, weights]
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
    return shapes, tensors


def bench_op(repeats):
    print("deformable attention op (encoder shapes, 8 heads x 32 dims, 3 levels x 4 points)")
    shapes, (value, loc, weights) = op_inputs(512, 1, requires_grad=False)
    base = None
    for name, fn in OPS.items():
        with torch.no_grad():
            t = measure(lambda: fn(value, shapes, loc, weights), repeats)
        report(f"inference 512x512, {name}", t, base)
        base = base or t
    with torch.no_grad():
        reference = ms_deform_attn_pytorch(value, shapes, loc, weights)
        for name in ("fast", "cpu"):
            diff = (OPS[name](value, shapes, loc, weights) - reference).abs().max().item()
            print(f"  max |{name} - pytorch| = {diff:.2e}")
    shapes, inputs = op_inputs(256, 2, requires_grad=True)
    grad = torch.randn(2, inputs[1].shape[1], 256)
    base = None
    for name, fn in OPS.items():

        def step():
            for t in inputs:
                t.grad = None
            fn(inputs[0], shapes, inputs[1], inputs[2]).backward(grad)

        t = measure(step, repeats)
        report(f"training 2x256x256 fwd+bwd, {name}", t, base)
        base = base or t


def bench_module(repeats):
    print("MSDeformAttn module (256 channels, query = value = all encoder positions)")
    for image_size, batch, train in ((512, 1, False), (256, 2, True)):
        shapes = encoder_shapes(image_size)
        s = sum(h * w for h, w in shapes)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, s, 256, generator=g, requires_grad=train)
        refs = torch.rand(batch, s, len(shapes), 2, generator=g)
        base = None
        for impl in IMPLS:
            torch.manual_seed(0)
            attn = MSDeformAttn(256, len(shapes), 8, 4, impl=impl)

            def run():
                if train:
                    attn(x, refs, x, shapes).sum().backward()
                else:
                    with torch.no_grad():
                        attn(x, refs, x, shapes)

            t = measure(run, repeats)
            label = "training 2x256x256 fwd+bwd" if train else "inference 512x512"
            report(f"{label}, {impl}", t, base)
            base = base or t


# ---------------------------------------------------------------------------------- decoder
def make_decoder(impl):
    torch.manual_seed(0)
    shapes = {
        k: ShapeSpec(channels=c, stride=4 * 2**i)
        for i, (k, c) in enumerate(SWIN_T_CHANNELS.items())
    }
    return MSDeformAttnPixelDecoder(
        shapes,
        transformer_dropout=0.0,
        transformer_nheads=8,
        transformer_dim_feedforward=1024,
        transformer_enc_layers=6,
        conv_dim=256,
        mask_dim=256,
        norm="GN",
        transformer_in_features=ENCODER_IN,
        common_stride=4,
        attention_impl=impl,
    )


def bench_decoder(repeats, profile):
    print("MSDeformAttnPixelDecoder (Swin-T features, 6 layers, 256 dims, 8 heads, 4 points)")
    feats = swin_t_features(512, 1)
    base, outputs = None, {}
    for impl in IMPLS:
        decoder = make_decoder(impl).eval()
        with torch.no_grad():
            outputs[impl] = decoder.forward_features(feats)[0]
            t = measure(lambda: decoder.forward_features(feats), repeats)
        report(f"inference 512x512, {impl}", t, base)
        base = base or t
    for impl in ("fast", "cpu"):
        diff = (outputs[impl] - outputs["pytorch"]).abs().max().item()
        print(f"  max |{impl} - pytorch| mask features = {diff:.2e}")
    feats = {k: v.requires_grad_() for k, v in swin_t_features(256, 2).items()}
    base = None
    for impl in IMPLS:
        decoder = make_decoder(impl).train()

        def step():
            mask_features, enc, multi_scale = decoder.forward_features(feats)
            (mask_features.mean() + sum(f.mean() for f in multi_scale)).backward()

        t = measure(step, repeats)
        report(f"training 2x256x256 fwd+bwd, {impl}", t, base)
        base = base or t
    if profile:
        decoder = make_decoder("cpu").eval()
        feats = swin_t_features(512, 1)
        with torch.no_grad(), torch.profiler.profile() as prof:
            decoder.forward_features(feats)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


# ------------------------------------------------------------------------------------- swin
def official_block_forward(block, x, h, w, attn_mask):
    """A Swin block in the official formulation (same weights): pad, roll, partition, explicit
    attention with bias and mask, then the inverse copies."""
    b, _, c = x.shape
    ws, shift, attn = block.window_size, block.shift_size, block.attn
    shortcut = x
    x = block.norm1(x).view(b, h, w, c)
    pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = x.shape[1:3]
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    windows = window_partition(x, ws)
    b_, n, _ = windows.shape
    qkv = attn.qkv(windows).reshape(b_, n, 3, attn.num_heads, c // attn.num_heads)
    qkv = qkv.permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]
    logits = q @ k.transpose(-2, -1) + attn.relative_position_bias().unsqueeze(0)
    if shift:
        nw = attn_mask.shape[0]
        logits = logits.view(b_ // nw, nw, attn.num_heads, n, n) + attn_mask[None, :, None]
        logits = logits.view(-1, attn.num_heads, n, n)
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b_, n, c)
    x = window_reverse(attn.proj(out), ws, hp, wp)
    if shift:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    x = shortcut + x[:, :h, :w, :].reshape(b, h * w, c)
    return x + block.mlp(block.norm2(x))


def official_backbone_forward(model, images):
    """``model`` (a D2SwinTransformer) run block by block with :func:`official_block_forward`."""
    x, h, w = model.forward_embed(images)
    outs = {}
    for i, stage in enumerate(model.layers):
        ws = stage.window_size
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        mask = shifted_window_attention_mask(hp, wp, ws, ws // 2, images.device)
        for blk in stage.blocks:
            x = official_block_forward(blk, x, h, w, mask)
        outs[f"res{i + 2}"] = model.forward_output(i, x, h, w)
        x, h, w = stage.forward_downsample(x, h, w)
    return outs


def bench_swin(repeats):
    print("Swin-T backbone (embed 96, depths 2-2-6-2, window 7)")
    torch.manual_seed(0)
    model = D2SwinTransformer(drop_path_rate=0.0)
    image = torch.randn(1, 3, 512, 512)
    model.eval()
    with torch.no_grad():
        ours, official = model(image), official_backbone_forward(model, image)
        diff = max((ours[k] - official[k]).abs().max().item() for k in ours)
        base = measure(lambda: official_backbone_forward(model, image), repeats)
        report("inference 512x512, official formulation", base)
        report("inference 512x512, this project", measure(lambda: model(image), repeats), base)
    print(f"  max |ours - official formulation| over res2..res5 = {diff:.2e}")
    model.train()
    images = torch.randn(2, 3, 256, 256)

    def step(fn):
        model.zero_grad(set_to_none=True)
        sum(v.mean() for v in fn(images).values()).backward()

    base = measure(lambda: step(lambda x: official_backbone_forward(model, x)), repeats)
    report("training 2x256x256 fwd+bwd, official formulation", base)
    report("training 2x256x256 fwd+bwd, this project", measure(lambda: step(model), repeats), base)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--only", default="op,module,decoder,swin", help="comma-separated sections")
    parser.add_argument("--profile", action="store_true", help="per-op profile of the fast decoder")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    sections = set(args.only.split(","))
    if "op" in sections:
        bench_op(args.repeats)
    if "module" in sections:
        bench_module(args.repeats)
    if "decoder" in sections:
        bench_decoder(args.repeats, args.profile)
    if "swin" in sections:
        bench_swin(args.repeats)


if __name__ == "__main__":
    main()
