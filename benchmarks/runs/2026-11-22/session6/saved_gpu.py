"""What a compiled layer keeps for its backward on the GPU (session 6 diagnosis of compile_layers' memory).

The TRL suite's 1x2048 run showed compile_layers at 5.4 GiB peak against 2.8 GiB op by op, while on the
CPU the region saves what op-by-op checkpointing saves. This builds 4 layers of Gemma 2 2B's shapes
(nf4 or bf16 base), LoRA r16 on all linears, non-reentrant checkpointing, autocast bf16, and reports per
variant the bytes saved for the backward (saved_tensors_hooks, distinct storages, parameters left out)
and the memory still allocated after the forward, on one packed row of 2048 tokens.

    python benchmarks/runs/2026-11-22/session6/saved_gpu.py --variant layers-flex [--bf16]
"""

import argparse
import tempfile

import torch


def build_like_profile_step(variant: str):
    """The model benchmarks.profile_step trains (2B shapes, random nf4 checkpoint, TRL's fused LM head)."""
    from benchmarks import profile_step

    namespace = argparse.Namespace(model="2b", contender={"ops": "fastgemma", "layers-auto": "fastgemma-layers"}[variant],
                                    tokens=2048, docs=2, lora_r=16, no_quantize=False, seed=1234,
                                    ckpt_dir="/tmp/ck", fastgemma_backend="auto")
    model, fused = profile_step.build(namespace, torch.device("cuda"))
    return model, fused


def build(quantized: bool, variant: str, layers: int, backend: str):
    import fastgemma
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        hidden_size=2304, intermediate_size=9216, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, vocab_size=4096, sliding_window=4096)
    torch.manual_seed(0)
    path = tempfile.mkdtemp()
    Gemma2ForCausalLM(config).save_pretrained(path)
    extra = {}
    if quantized:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = Gemma2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": 0},
                                              attn_implementation="eager", **extra)
    if variant != "hf-eager":
        backend = backend or {"ops": "auto", "layers-flex": "flex", "layers-compiled": "compiled",
                              "layers-auto": "auto"}[variant]
        fastgemma.patch_model(model, max_seq_length=2048, backend=backend, fused_ops=True,
                              compile_layers=variant.startswith("layers"))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model.train()


def measure(model, fused_head=False):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages, shapes = {}, {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
            shapes[storage.data_ptr()] = (tuple(tensor.shape), str(tensor.dtype))
        return tensor

    positions = torch.cat([torch.arange(1300), torch.arange(748)])[None].cuda()
    ids = torch.randint(0, 4096, (1, 2048)).cuda()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cuda", dtype=torch.bfloat16):
        extra = {"fused_lm_head": True} if fused_head else {}
        out = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False, **extra)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    out.loss.backward()
    return sum(storages.values()), held, shapes, storages


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="layers-flex",
                        choices=["hf-eager", "ops", "layers-flex", "layers-compiled", "layers-auto"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--sac-all-recompute", action="store_true",
                        help="checkpoint with a selective-checkpoint policy that recomputes every op")
    parser.add_argument("--profile-step-model", action="store_true",
                        help="profile_step's 26-layer 2B model (random nf4 checkpoint, TRL fused LM head)")
    parser.add_argument("--bf16", action="store_true", help="bf16 base instead of nf4")
    args = parser.parse_args()
    from torch._dynamo.utils import counters

    fused_head = False
    if args.profile_step_model:
        model, fused_head = build_like_profile_step(args.variant)
    else:
        model = build(not args.bf16, args.variant, args.layers, args.backend)
    if args.sac_all_recompute:
        import functools

        from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

        def recompute_everything():
            return create_selective_checkpoint_contexts(lambda ctx, op, *a, **k: CheckpointPolicy.MUST_RECOMPUTE)

        func = functools.partial(checkpoint, use_reentrant=False, context_fn=recompute_everything)
        for module in model.modules():
            if hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = func
    for _ in range(2):
        measure(model, fused_head)
    saved, held, shapes, storages = measure(model, fused_head)
    print(f"graphs {dict(counters['stats'])}; breaks {dict(counters['graph_break'])}")
    mib = 2**20
    print(f"RESULT {args.variant} {'bf16' if args.bf16 else 'nf4'} backend={args.backend} sac={args.sac_all_recompute} "
          f"{'profile_step model' if args.profile_step_model else f'{args.layers} layers'}: saved for backward "
          f"{saved / mib:,.1f} MiB, held after forward {held / mib:,.1f} MiB (2048 tokens)")
    by_shape = {}
    for key, nbytes in storages.items():
        count, total = by_shape.get(shapes[key], (0, 0))
        by_shape[shapes[key]] = (count + 1, total + nbytes)
    for shape, (count, total) in sorted(by_shape.items(), key=lambda item: -item[1][1])[:10]:
        print(f"   {count:3d} x {shape}: {total / mib:8.1f} MiB")


if __name__ == "__main__":
    main()
