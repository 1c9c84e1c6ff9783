"""patch_model(cuda_graphs=True) on CPU: the graphed-layer machinery without the capture itself.

On a CPU, fastgemma.graphs "replays" a layer by re-running its recorded call on the same static buffers,
so everything but the CUDA capture is checked here: bucket padding, the static copies of the rotary
tables and masks, the checkpointed backward, gradient accumulation through shared buffers, two forwards
before their backwards, recapture when weights change, and the fallbacks. The GPU tests replay real graphs.
"""

import copy
import functools
import logging

import pytest
import torch

import fastgemma
from conftest import random_gemma2, relative_error, tiny_gemma2_config
from fastgemma import graph_policy, graphs, log, regions
from fastgemma.patches import gemma2 as glue
from test_compile_layers import assert_padded_steps_match, lora_models, packed_step, saved_bytes


@pytest.fixture
def eager_body(monkeypatch):
    """The layer body (and the compiled-region fallback) uncompiled: the graph machinery is what these tests
    check, and compiling on a CPU is slow."""
    monkeypatch.setattr(regions, "compiled", lambda function: function)


def graph_state(model):
    return next(m for m in model.modules() if "_fastgemma_state" in m.__dict__)._fastgemma_state


def test_bucket_lengths_split_the_fixed_length_into_eight_steps():
    assert [graphs.bucket_length(n, 2048) for n in (1, 256, 257, 1000, 2048)] == [256, 256, 512, 1024, 2048]
    assert {graphs.bucket_length(n, 2048) for n in range(1, 2049)} == {256 * k for k in range(1, 9)}
    assert graphs.bucket_length(100, 300) == 128 and graphs.bucket_length(300, 300) == 384  # 128-multiples
    assert graphs.bucket_length(5000, 4096) == 5120  # past the fixed length (flex grows its masks)


def assert_packed_steps_match(reference, model, steps):
    """One packed training step per list of document lengths: `model`'s logits, loss and LoRA gradients (4 layers'
    7 adapted linears, A and B) are HF eager + PEFT's."""
    for step, lengths in enumerate(steps):
        ref_logits, ref_loss, ref_grads = packed_step(reference, lengths, step)
        logits, loss, grads = packed_step(model, lengths, step)
        assert relative_error(logits, ref_logits) < 1e-4 and relative_error(loss, ref_loss) < 1e-4
        assert grads.keys() == ref_grads.keys() and len(grads) == 4 * 7 * 2
        for name in grads:
            assert relative_error(grads[name], ref_grads[name]) < 1e-3, name


def test_graphed_layers_train_like_hf_eager_over_lengths_and_buckets():
    """Packed steps of three lengths over two buckets, with the compiled body: HF eager + PEFT's loss and
    gradients; each layer recorded once per bucket, and a repeated length replays."""
    torch._dynamo.reset()
    reference, patched = lora_models(random_gemma2(tiny_gemma2_config(window=16)), True, cuda_graphs=True)
    state = graph_state(patched)
    state.cache = type(state.cache)(256)  # two buckets of 128 tokens
    assert_packed_steps_match(reference, patched, [[40, 9, 30], [25, 150], [7, 33, 12, 20], [40, 9, 30]])
    assert state.graphs._lengths == {128, 256} and fastgemma.cuda_graph_lengths(patched) == [128, 256]
    assert state.graphs.captures == 4 * 2  # layers x buckets, whatever the number of steps
    # the shorter bucket came first, and both view one storage sized for the masks' fixed length
    assert [len(storages) for storages in state.graphs._storages.values()] == [1]


@pytest.mark.parametrize("side", ["right", "left"])
def test_graphed_layers_on_padded_batches_match_the_op_by_op_step(eager_body, side):
    base = random_gemma2(tiny_gemma2_config(window=16))
    _, by_ops = lora_models(copy.deepcopy(base), True)
    _, graphed = lora_models(base, True, cuda_graphs=True)
    assert_padded_steps_match(by_ops, graphed, side)
    assert graph_state(graphed).graphs.captures > 0


def test_graphed_forward_and_backward_share_one_compile_of_the_layer_body(monkeypatch):
    """The recorded forward runs the call its backward recomputes (autograd on), so over several buckets and
    every layer the body compiles once per mask kind (here one: CPU layers read dense masks), not once more
    for a no-grad forward (3-5 s each on an H200, in the first optimizer step)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(glue.decoder_layer_body, backend=counter)
    monkeypatch.setattr(regions, "compiled", lambda function: compiled if function is glue.decoder_layer_body
                        else pytest.fail(f"compiled {function.__name__}"))
    _, graphed = lora_models(random_gemma2(tiny_gemma2_config(window=16)), True, cuda_graphs=True)
    graph_state(graphed).cache = type(graph_state(graphed).cache)(256)  # two buckets of 128 tokens
    for step, lengths in enumerate([[40, 9, 30], [25, 150], [7, 33, 12, 20]]):
        packed_step(graphed, lengths, step)
    assert fastgemma.cuda_graph_lengths(graphed) == [128, 256] and graph_state(graphed).graphs.captures == 4 * 2
    assert counter.frame_count == 1, f"the layer body compiled {counter.frame_count} times"


def test_graphed_layers_accumulate_and_allow_two_forwards_before_the_backwards(eager_body):
    """Every replay writes the same static buffers: accumulated micro-steps, and two forwards whose backwards
    come later (the second forward overwrote the buffers), must still give the op-by-op gradients."""
    base = random_gemma2(tiny_gemma2_config(window=16))
    _, by_ops = lora_models(copy.deepcopy(base), True)
    _, graphed = lora_models(base, True, cuda_graphs=True)
    batches = [[40, 9, 30], [25, 50], [7, 33, 12, 20], [60, 4]]
    grads = []
    for model in (by_ops, graphed):
        model.zero_grad(set_to_none=True)
        for seed, lengths in enumerate(batches[:2]):
            packed_loss(model, lengths, seed).backward()
        (packed_loss(model, batches[2], 2) + packed_loss(model, batches[3], 3)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * 7 * 2
    for name in grads[0]:
        assert relative_error(grads[1][name], grads[0][name]) < 1e-4, name


def packed_loss(model, lengths, seed):
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(0, 97, (1, sum(lengths)), generator=torch.Generator().manual_seed(seed))
    return model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss


def test_graphed_layers_keep_only_each_layers_input_for_the_backward(eager_body):
    """Gradient checkpointing's promise, measured with saved_tensors_hooks on a step after the recording one:
    the graphed layers keep for the backward no more than op-by-op checkpointing does (each layer's input), at
    4 and 8 layers, and far less than without checkpointing. (Their static buffers and graph pool are a fixed
    amount per bucket, not saved per layer.)"""
    for layers in (4, 8):
        base = random_gemma2(tiny_gemma2_config(window=16, layers=layers))
        _, by_ops = lora_models(copy.deepcopy(base), True)
        _, unchecked = lora_models(copy.deepcopy(base), False)
        _, graphed = lora_models(base, True, cuda_graphs=True)
        # The first step records each layer: the recordings' own autograd stays out of the caller's hooks.
        recording_bytes = saved_bytes(graphed)
        graphed_bytes = saved_bytes(graphed)
        assert graph_state(graphed).graphs.captures == layers
        assert recording_bytes == graphed_bytes <= saved_bytes(by_ops), (layers, recording_bytes, graphed_bytes)
        assert graphed_bytes < saved_bytes(unchecked) / 5


def test_graphed_layers_record_again_when_weights_change_and_copies_record_their_own(eager_body, caplog):
    """A layer's graphs bake in its weights: replacing a LoRA weight records that layer again, a deep copy
    of the model records its own graphs, and an unpatched model has none left."""
    base = random_gemma2(tiny_gemma2_config(window=16))
    reference, graphed = lora_models(base, True, cuda_graphs=True)
    packed_step(graphed, [30, 20], 0)
    state = graph_state(graphed)
    assert state.graphs.captures == 4
    for model in (reference, graphed):  # the same new weight in both
        layer = next(m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
        layer.lora_A["default"].weight = torch.nn.Parameter(torch.full_like(layer.lora_A["default"].weight, 0.01))
    _, loss_ref, grads_ref = packed_step(reference, [30, 20], 1)
    with caplog.at_level(logging.WARNING, logger="fastgemma"):
        _, loss, grads = packed_step(graphed, [30, 20], 1)
    assert state.graphs.captures == 5 and state.graphs.recordings_again == 1  # that one layer again
    assert "recording a Gemma2DecoderLayer again (1 so far): its parameters" in caplog.text
    assert relative_error(loss, loss_ref) < 1e-4
    assert all(relative_error(grads[n], grads_ref[n]) < 1e-3 for n in grads_ref)

    import pickle

    assert pickle.loads(pickle.dumps(state.graphs)).captures == 0  # pickles, without its graphs
    twin = copy.deepcopy(graphed)
    assert graph_state(twin).graphs.captures == 0 and graph_state(twin).graphs is not state.graphs
    _, loss_twin, _ = packed_step(twin, [30, 20], 1)
    assert graph_state(twin).graphs.captures == 4 and state.graphs.captures == 5
    assert relative_error(loss_twin, loss) < 1e-6
    fastgemma.unpatch_model(graphed)
    assert not any("_fastgemma_state" in m.__dict__ for m in graphed.modules())


def lora_dropout_model(base, **patch):
    """`base` patched (fused ops), with LoRA dropout, checkpointing and train mode; the graph choices' log reset."""
    from peft import LoraConfig, get_peft_model

    model = fastgemma.patch_model(base, max_row_tokens=128, fused_ops=True, **patch)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    log.said.clear()
    return model


def test_graphed_layers_fall_back_where_a_graph_would_be_wrong(eager_body, caplog):
    """LoRA dropout (a graph would replay one random draw): a warning, and the layers run as compiled regions,
    with the op-by-op results. Inference never records."""
    base = random_gemma2(tiny_gemma2_config(window=16))
    model = lora_dropout_model(copy.deepcopy(base), cuda_graphs=True)
    with caplog.at_level(logging.WARNING, logger="fastgemma"):
        packed_loss(model, [30, 20], 0).backward()
    assert "LoRA layer is not in its plain state" in caplog.text
    assert graph_state(model).graphs.captures == 0

    _, graphed = lora_models(base, True, cuda_graphs=True)
    with torch.no_grad():
        packed_loss(graphed, [30, 20], 0)
    graphed.eval()
    packed_loss(graphed, [30, 20], 0)
    assert graph_state(graphed).graphs.captures == 0


def kept_recordings(model) -> int:
    return sum(graphs.pool is not None for graphs in graph_state(model).graphs._layers.values())


def test_kept_graphed_layers_train_like_hf_eager_without_recompute(eager_body):
    """Layers without checkpointing run kept graphs (the backward differentiates the forward's own activations):
    HF eager + PEFT's loss and gradients over steps and buckets, one kept recording per layer and bucket, and the
    checkpointed recordings never made."""
    reference, kept = lora_models(random_gemma2(tiny_gemma2_config(window=16)), False, cuda_graphs=True)
    state = graph_state(kept)
    state.cache = type(state.cache)(256)  # two buckets of 128 tokens
    assert_packed_steps_match(reference, kept, [[40, 9, 30], [25, 150], [40, 9, 30]])
    assert state.graphs.captures == kept_recordings(kept) == 4 * 2


def test_kept_graphed_layers_recompute_when_a_second_forward_replayed_over_their_activations(eager_body):
    """A layer's pool holds one call's activations: two forwards before their backwards, and a second backward
    through a retained graph, must recompute (through checkpointed recordings made then) and still give the
    op-by-op gradients; a later ordinary step replays the kept recordings again."""
    base = random_gemma2(tiny_gemma2_config(window=16))
    _, by_ops = lora_models(copy.deepcopy(base), False)
    _, kept = lora_models(base, False, cuda_graphs=True)
    grads = []
    for model in (by_ops, kept):
        model.zero_grad(set_to_none=True)
        packed_loss(model, [40, 9, 30], 0).backward()
        (packed_loss(model, [7, 33, 12, 20], 2) + packed_loss(model, [60, 4], 3)).backward()
        loss = packed_loss(model, [25, 50], 1)
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * 7 * 2
    for name in grads[0]:
        assert relative_error(grads[1][name], grads[0][name]) < 1e-4, name
    graphs = graph_state(kept).graphs
    assert kept_recordings(kept) == 4 and graphs.captures == 8  # each layer's checkpointed pair, made on demand
    before = graphs.captures
    ref_grads = packed_step(by_ops, [30, 20], 4)[2]
    kept_grads = packed_step(kept, [30, 20], 4)[2]
    assert graphs.captures == before and all(relative_error(kept_grads[n], ref_grads[n]) < 1e-4 for n in ref_grads)


def test_checkpointed_and_kept_graphed_layers_mix_and_release(eager_body):
    """The memory budget keeps the last layers (checkpointing lowered) and checkpoints the others: both kinds of
    recording in one step train like HF eager, and releasing kept recordings leaves only the layers named."""
    reference, graphed = lora_models(random_gemma2(tiny_gemma2_config(window=16)), True, cuda_graphs=True)
    layers = [m for m in graphed.modules() if type(m).__name__ == "Gemma2DecoderLayer"]
    for layer in layers[2:]:
        layer.gradient_checkpointing = False
    _, ref_loss, ref_grads = packed_step(reference, [40, 9, 30], 0)
    _, loss, grads = packed_step(graphed, [40, 9, 30], 0)
    assert relative_error(loss, ref_loss) < 1e-4
    assert all(relative_error(grads[n], ref_grads[n]) < 1e-3 for n in ref_grads)
    graphs = graph_state(graphed).graphs
    assert kept_recordings(graphed) == 2 and graphs.captures == 4
    graphs.release_kept(layers[3:])
    assert kept_recordings(graphed) == 1 and graphs.kept_bytes(layers[2]) == 0 < graphs.kept_bytes(layers[3])
    graphs.release_kept()
    assert kept_recordings(graphed) == 0


def test_auto_buckets_split_the_lengths_auto_graphs_not_max_row_tokens(monkeypatch, eager_body):
    """cuda_graphs="auto" graphs micro-steps of at most AUTO_MAX_TOKENS tokens, so its buckets split that range:
    bucketed over a much longer max_row_tokens, a short call would run padded to several times its length.
    Forced graphs keep max_row_tokens's buckets. Both train like HF eager."""
    monkeypatch.setattr(graph_policy, "auto_declines", lambda hidden_states: None)  # as on one CUDA GPU
    monkeypatch.setattr(graph_policy, "AUTO_MAX_TOKENS", 256)
    base = random_gemma2(tiny_gemma2_config(window=16))
    reference, auto = lora_models(copy.deepcopy(base), True)
    _, forced = lora_models(copy.deepcopy(base), True, cuda_graphs=True)
    for model in (auto, forced):
        graph_state(model).cache = type(graph_state(model).cache)(2048)  # max_row_tokens far above the calls
    ref_logits, ref_loss, _ = packed_step(reference, [40, 9, 30], 0)
    for model, bucket in ((auto, 128), (forced, 256)):  # 256 / 8 rounded up to 128; 2048 / 8
        logits, loss, _ = packed_step(model, [40, 9, 30], 0)
        assert relative_error(logits, ref_logits) < 1e-4 and relative_error(loss, ref_loss) < 1e-4
        assert fastgemma.cuda_graph_lengths(model) == [bucket]
    hidden = auto.get_base_model().config.hidden_size
    assert [storage.input.numel() for storage in graph_state(auto).graphs._storages[("cpu", torch.float32)]] == [
        256 * hidden]  # static inputs sized for the longest auto call, not for max_row_tokens


def test_graphed_models_block_masks_have_room_past_the_longest_bucket():
    """The flex block masks are one empty block longer than max_row_tokens's last bucket, so no bucket fills
    them (a batch that did made the compiled layer compile a second variant); off again, they are not."""
    model = fastgemma.patch_model(random_gemma2(tiny_gemma2_config()), max_row_tokens=2048, cuda_graphs=True)
    state = graph_state(model)
    assert state.cache.length == 2048 + 128 and graphs.bucket_length(2048, state.cache.max_row_tokens) == 2048
    fastgemma.patch_model(model, max_row_tokens=2048, cuda_graphs=False)
    assert graph_state(model).cache.length == 2048 and graph_state(model).graphs is None


@pytest.mark.parametrize("kind", ["packed", "padded"])
def test_static_flex_masks_follow_each_batch(kind):
    """A graphed layer's flex mask is a static copy, loaded per batch: block lists, and the tensors its mask and
    score functions read (a padded batch's uniform rows included). Flex forward on CPU, past-the-batch
    positions holding junk as in a bucket, against each batch's own mask."""
    from fastgemma.attention import softcap_attention
    from fastgemma.graph_inputs import RotaryMaskInputs
    from fastgemma.masks import AttentionMask, BlockMaskCache

    binder = RotaryMaskInputs()
    cache, tokens, bucket = BlockMaskCache(256), 150, 200
    generator = torch.Generator().manual_seed(4)

    def batch_mask(seed):
        if kind == "packed":
            cuts = torch.sort(torch.randint(1, tokens, (3,), generator=generator)).values
            return AttentionMask(tokens, tokens, window=24, cache=cache,
                                 segment_ids=torch.bucketize(torch.arange(tokens), cuts, right=True)[None].repeat(2, 1))
        real = torch.ones(2, tokens, dtype=torch.bool)
        real[0, : 10 + seed * 30] = False  # left padding
        real[1, 100 - seed * 20:] = False  # right padding past the window
        return AttentionMask(tokens, tokens, window=24, cache=cache, real_tokens=real)

    rotary = torch.zeros(2, tokens, 16)
    static, kwargs = binder.make((rotary, rotary, batch_mask(0), True), bucket)
    for seed in range(2):
        mask = batch_mask(seed)
        binder.load(static, (rotary, rotary, mask, True))
        q, k, v = (torch.randn(2, n, bucket, 16, generator=generator) * 3 for n in (4, 2, 2))
        attend = functools.partial(softcap_attention, scale=0.25, softcap=50.0, backend="flex")
        with torch.no_grad():
            graphed = attend(q, k, v, kwargs["attention_mask"])[:, :, :tokens]
            expected = attend(q[:, :, :tokens], k[:, :, :tokens], v[:, :, :tokens], mask)
        assert torch.equal(graphed, expected), seed


def test_cuda_graphs_setting_is_checked():
    model = random_gemma2(tiny_gemma2_config())
    with pytest.raises(ValueError, match="cuda_graphs must be 'auto', True or False"):
        fastgemma.patch_model(model, cuda_graphs="yes")
    with pytest.raises(ValueError, match="needs fused_ops"):
        fastgemma.patch_model(model, cuda_graphs=True, fused_ops=False)
    for layers in ({"cuda_graphs": True}, {"compiled_regions": True}):  # FA4 runs from fastgemma's own flex call only
        with pytest.raises(ValueError, match="not inside compiled decoder layers"):
            fastgemma.PatchOptions(flex_kernel_options="experimental-flash", **layers)
    with pytest.raises(ValueError, match="replay must be"):
        graphs.GraphedLayers(lambda layer, x: x, graphs.StaticBinder(), replay="sometimes")._mode(torch.device("cpu"))


class _ScaleBinder(graphs.StaticBinder):
    """A per-batch scale vector as the layer's one bound input (the model-agnostic core's own test)."""

    def key(self, sources, length):
        return (sources[0].shape[-1], length)

    def make(self, sources, length):
        static = {"scale": torch.zeros_like(sources[0])}
        return static, {"scale": static["scale"]}

    def load(self, static, sources):
        static["scale"].copy_(sources[0])


def test_graphed_layers_core_matches_autograd_on_a_small_stack():
    """GraphedLayers around plain Linear layers: outputs and gradients equal to running them directly,
    padding rows included (they must add nothing), with one recording per layer."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 8) for _ in range(3)]
    runner = graphs.GraphedLayers(lambda layer, x, scale: torch.tanh(layer(x)) * scale, _ScaleBinder())
    for tokens in (5, 7):
        x = torch.randn(2, tokens, 8, requires_grad=True)
        scale = torch.rand(8)
        expected, actual = x, x
        for layer in layers:
            expected = torch.tanh(layer(expected)) * scale
            actual = runner(layer, actual, (scale,), 16)
        torch.testing.assert_close(actual, expected)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # other casts: graphs of their own, not the fp32 ones
            cast = runner(layers[0], x, (scale,), 16)
            cast_expected = torch.tanh(layers[0](x)) * scale
        assert runner.captures == 4  # the first layer recorded once more, under autocast, at the first length
        torch.testing.assert_close(cast, cast_expected.float())  # the layer's output dtype is its input's
        assert not torch.equal(cast, torch.tanh(layers[0](x)) * scale)  # and it did compute in bfloat16
        grads_expected = torch.autograd.grad(expected.square().sum(), [x, *(p for l in layers for p in l.parameters())])
        grads_actual = torch.autograd.grad(actual.square().sum(), [x, *(p for l in layers for p in l.parameters())])
        for ours, theirs in zip(grads_actual, grads_expected):
            torch.testing.assert_close(ours, theirs)
    assert runner.captures == 4  # three layers, and the first once more under autocast


def test_graphed_layers_take_retained_graphs_and_refuse_double_backward_in_one_line():
    """backward(retain_graph=True) replays a layer's backward again (twice the gradients, as autograd's);
    create_graph=True gives the first-order gradients, and differentiating them again raises fastgemma's
    one line (a replay records no graph: its gradients would otherwise count as constants)."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 8) for _ in range(2)]
    runner = graphs.GraphedLayers(lambda layer, x, scale: torch.tanh(layer(x)) * scale, _ScaleBinder())
    x, scale = torch.randn(2, 5, 8, requires_grad=True), torch.rand(8)
    weights = [x, *(p for layer in layers for p in layer.parameters())]
    expected, actual = x, x
    for layer in layers:
        expected = torch.tanh(layer(expected)) * scale
        actual = runner(layer, actual, (scale,), 16)
    once = torch.autograd.grad(expected.square().sum(), weights, retain_graph=True)
    loss = actual.square().sum()
    loss.backward(retain_graph=True)
    first = [w.grad.clone() for w in weights]
    loss.backward(retain_graph=True)
    for w, f, e in zip(weights, first, once):
        torch.testing.assert_close(f, e)
        torch.testing.assert_close(w.grad, 2 * e)
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    for ours, theirs in zip(grads, once):
        torch.testing.assert_close(ours, theirs)
    with pytest.raises(RuntimeError, match=r"^fastgemma: CUDA-graphed layers \(cuda_graphs=True\) have no double backward"):
        sum(g.square().sum() for g in grads).backward()


def test_graphed_model_takes_retained_graphs():
    """A model with graphed (compiled) layers: a second backward through a retained graph adds HF eager + PEFT's
    gradients again."""
    from conftest import assert_same_gradients, gradients_after_backwards

    reference, graphed = lora_models(random_gemma2(tiny_gemma2_config(layers=2, window=16)), True, cuda_graphs=True)
    positions = torch.cat([torch.arange(n) for n in (30, 10)])[None]
    ids = torch.randint(0, 97, (1, 40))
    inputs = dict(input_ids=ids, position_ids=positions, labels=ids)
    gradients_after_backwards(graphed, times=1, **inputs)
    assert graph_state(graphed).graphs.captures == 2
    expected = gradients_after_backwards(reference, **inputs)
    assert_same_gradients(gradients_after_backwards(graphed, **inputs), expected)


def test_graphed_layers_share_static_buffers_across_buckets_and_layers():
    """The buffers a graph reads and writes are shared (a 12% higher peak at 4×4096 on an H200 came from a set per
    bucket, and every layer's own gradient outputs): buckets view one storage when the first was the largest,
    each layer's output is written over its input buffer, and the parameter gradients land in one buffer per
    slot for all layers. Results stay exact through two buckets, interleaved forwards and backwards."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 8) for _ in range(3)]
    runner = graphs.GraphedLayers(lambda layer, x, scale: torch.tanh(layer(x)) * scale, _ScaleBinder())
    params = [p for layer in layers for p in layer.parameters()]
    for tokens, length in ((14, 16), (5, 8), (7, 8), (13, 16)):
        x = torch.randn(2, tokens, 8, requires_grad=True)
        scale = torch.rand(8)
        expected, actual = x, x
        for layer in layers:
            expected = torch.tanh(layer(expected)) * scale
            actual = runner(layer, actual, (scale,), length)
        torch.testing.assert_close(actual, expected)
        grads_expected = torch.autograd.grad(expected.square().sum(), [x, *params])
        grads_actual = torch.autograd.grad(actual.square().sum(), [x, *params])
        for ours, theirs in zip(grads_actual, grads_expected):
            torch.testing.assert_close(ours, theirs)
    assert runner.captures == 3 * 2
    (storages,) = runner._storages.values()
    assert len(storages) == 1 and storages[0].input.numel() == 2 * 16 * 8  # the 8-token bucket views the 16's
    for buffers in runner._buffers.values():
        assert buffers.out is buffers.x and buffers.x.data_ptr() == storages[0].input.data_ptr()
    assert len(runner._grad_buffers) == 2  # weight and bias: one buffer each for all three layers
    with torch.no_grad():  # a larger bucket later gets a storage of its own; the earlier graphs keep theirs
        for tokens, length in ((30, 32), (6, 8)):
            x = torch.randn(2, tokens, 8)
            torch.testing.assert_close(runner(layers[0], x, (scale,), length), torch.tanh(layers[0](x)) * scale)
    assert [s.input.numel() for s in runner._storages[("cpu", torch.float32)]] == [2 * 16 * 8, 2 * 32 * 8]
    # told the longest bucket to expect (the model's glue passes its masks' fixed length), a short first bucket
    # sizes the storage for it, and the longer one shares it
    sized = graphs.GraphedLayers(lambda layer, x, scale: torch.tanh(layer(x)) * scale, _ScaleBinder())
    with torch.no_grad():
        for tokens, length in ((6, 8), (14, 16)):
            x = torch.randn(2, tokens, 8)
            torch.testing.assert_close(sized(layers[0], x, (scale,), length, capacity=16), torch.tanh(layers[0](x)) * scale)
    assert [s.input.numel() for s in sized._storages[("cpu", torch.float32)]] == [2 * 16 * 8]


@pytest.mark.parametrize("device_type, tokens, processes, declined", [
    ("cuda", 2048, 1, None),
    ("cuda", 4096, 1, None),
    ("cuda", 4097, 1, "micro-steps of more than 4096 tokens"),
    ("cuda", 16384, 1, "micro-steps of more than 4096 tokens"),
    ("cpu", 2048, 1, "not on a CUDA GPU"),
    ("cuda", 2048, 2, "several processes"),
])
def test_auto_graphs_only_short_micro_steps_on_one_gpu(device_type, tokens, processes, declined):
    why = graph_policy.auto_graphs_decline(device_type, tokens, processes)
    assert why == declined if declined is None else declined in why


def test_auto_is_the_default_and_runs_op_by_op_where_graphs_would_not_help(caplog):
    """patch_model's default cuda_graphs="auto": on a CPU the layers run op by op (no recording, no compiled
    region), the op-by-op results, and the log says once why."""
    base = random_gemma2(tiny_gemma2_config(window=16))
    _, reference = lora_models(copy.deepcopy(base), True, cuda_graphs=False)
    _, auto = lora_models(copy.deepcopy(base), True)
    assert graph_state(auto).options.cuda_graphs == "auto"
    log.said.clear()
    with caplog.at_level(logging.INFO, logger="fastgemma"):
        for _ in range(2):
            auto_loss = packed_loss(auto, [30, 20], 0)
            auto_loss.backward()
    reference_loss = packed_loss(reference, [30, 20], 0)
    reference_loss.backward()
    assert caplog.text.count("cuda_graphs=auto: not on a CUDA GPU; those layers run op by op") == 1
    assert graph_state(auto).graphs.captures == 0 and fastgemma.cuda_graph_lengths(auto) == []
    assert torch.equal(auto_loss, reference_loss)


def test_auto_falls_back_op_by_op_where_a_graph_would_be_wrong(monkeypatch, caplog):
    """Where auto would graph (pretended here on a CPU) but cannot (LoRA dropout), the layers run op by op,
    not as compiled regions, and the log says why once."""
    monkeypatch.setattr(graph_policy, "auto_declines", lambda hidden_states: None)
    monkeypatch.setattr(regions, "compiled", lambda function: pytest.fail("ran a compiled region under auto"))
    model = lora_dropout_model(random_gemma2(tiny_gemma2_config(window=16)))
    with caplog.at_level(logging.INFO, logger="fastgemma"):
        packed_loss(model, [30, 20], 0).backward()
    assert "cuda_graphs=auto: a LoRA layer is not in its plain state" in caplog.text
    assert "those layers run op by op" in caplog.text
    assert graph_state(model).graphs.captures == 0
