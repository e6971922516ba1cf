"""Forward hooks run on every decode step, as on Meta's model (llama/hooks.py).

The fast steps call no submodule (the fused C step runs whole blocks, a CUDA graph replays what it
recorded), so a hook that steers or reads a layer would silently act on the prompt only. Checked
with the real fast paths on this CPU (the fused step, as ``speed_up`` sets it) and with the
stand-in graph of test_cuda_graph.py: a hook that forces a token is obeyed at every step, a counting
hook counts every forward, and with the hooks removed the fast step runs again.
"""

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook

from llama import hooks
from llama.cuda_graph import GraphedDecodeStep
from llama.generation import Llama

from test_cuda_graph import fake_capture, make_model
from test_fused import ARGS, calls, fused_model, lib  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = [[1, 2, 3, 4]]
STEPS = 6


def force(token: int):
    """A forward hook on the output layer that makes ``token`` the only choice."""

    def hook(_module, _inputs, logits):
        forced = torch.full_like(logits, -1e4)
        forced[..., token] = 0
        return forced

    return hook


def clear(calls) -> None:
    calls.clear(), calls.sizes.clear(), calls.heads.clear()


def test_hooks_fire_on_every_fused_step(lib, tokenizer, calls):
    model = fused_model(ARGS["gqa"])
    llm = Llama(model, tokenizer)
    free, _ = llm.generate(PROMPT, STEPS, temperature=0)
    assert len(calls) > 0, "the fused C step should run here without hooks"
    token = next(t for t in range(5, 200) if t not in free)

    handle = model.output.register_forward_hook(force(token))
    clear(calls)
    forced, _ = llm.generate(PROMPT, STEPS, temperature=0)
    handle.remove()
    assert forced == [[token] * STEPS]
    assert not any(calls.heads)  # the whole-model call (with the output) stepped aside; blocks alone may run

    seen = []
    handles = [model.layers[1].attention.wq.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))]
    handles.append(model.layers[0].feed_forward.register_forward_pre_hook(lambda m, i: seen.append(-1)))
    again, _ = llm.generate(PROMPT, STEPS, temperature=0)
    assert again == free  # the plain forward gives the same tokens
    assert seen.count(-1) == STEPS and [n for n in seen if n > 0] == [len(PROMPT[0])] + [1] * (STEPS - 1)
    for h in handles:
        h.remove()

    clear(calls)
    assert llm.generate(PROMPT, STEPS, temperature=0)[0] == free
    assert len(calls) > 0, "without hooks the fused step runs again"


def test_global_module_hooks_fire_on_fused_steps(lib, tokenizer, calls):
    model = fused_model(ARGS["gqa"])
    llm = Llama(model, tokenizer)
    norms = []
    handle = register_module_forward_hook(lambda m, i, o: norms.append(1) if m is model.layers[0].ffn_norm else None)
    try:
        llm.generate(PROMPT, STEPS, temperature=0)
    finally:
        handle.remove()
    assert len(norms) == STEPS and calls == []


def test_a_block_alone_steps_aside_for_its_modules_hooks(lib, calls):
    model = fused_model(ARGS["gqa"])
    block = model.layers[0]
    x = torch.randn(1, 1, ARGS["gqa"].dim).bfloat16()
    cos, sin = model._rope_cos[:1], model._rope_sin[:1]  # position 0's angles, as the model passes them
    with torch.inference_mode():
        fast = block(x, cos, sin, 0)
        assert calls == [0]
        seen = []
        handle = block.attention.wo.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        plain = block(x, cos, sin, 0)
        handle.remove()
    assert calls == [0] and seen == [torch.Size([1, 1, ARGS["gqa"].dim])]
    torch.testing.assert_close(plain, fast, rtol=0.02, atol=0.02)


def test_the_librarys_own_hooks_do_not_count():
    layer = torch.nn.Linear(2, 2)
    dicts = hooks.hook_dicts(layer.modules())
    handle = layer.register_forward_hook(hooks.own(lambda m, i, o: None))
    assert not hooks.hooked(dicts)
    layer.register_forward_pre_hook(lambda m, i: None)
    assert hooks.hooked(dicts)  # a hook registered after the dictionaries were gathered
    handle.remove()


def test_graphed_steps_step_aside_for_hooks(tokenizer):
    model = make_model()
    llm, captures = Llama(model, tokenizer), []
    stand_in = fake_capture(model, captures)

    def capture(run, tokens, start_pos):
        captured = stand_in(run, tokens, start_pos)
        graph = captured.graph
        replay = graph.replay

        def checked() -> None:  # a real graph replays kernels: no Python hook would run
            assert not any(m._forward_hooks for m in model.modules()), "a graph replayed while a hook waits"
            replay()

        graph.replay = checked
        return captured

    llm.decode_step = GraphedDecodeStep(model, capture=capture)
    free, _ = llm.generate(PROMPT, STEPS, temperature=0)
    assert captures == [1]
    token = next(t for t in range(5, 200) if t not in free[0])
    handle = model.output.register_forward_hook(force(token))
    forced, _ = llm.generate(PROMPT, STEPS, temperature=0)
    handle.remove()
    assert forced == [[token] * STEPS]  # a replayed graph would have ignored the hook after the prompt
    assert llm.generate(PROMPT, STEPS, temperature=0)[0] == free
