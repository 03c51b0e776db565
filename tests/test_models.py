import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptft.errors import ConfigError
from gptft.models import build_model, model_config, sample_tokens
from gptft.tasks import lr_lambda


def test_saved_model_loads_back_through_from_pretrained(tiny_model_dir):
    assert (tiny_model_dir / "config.json").is_file() and (tiny_model_dir / "tokenizer.json").is_file()
    ours = build_model(name_or_path=str(tiny_model_dir)).eval()  # no dropout, to compare logits
    theirs = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    x = torch.randint(0, 50257, (2, 16))
    assert ours.config.n_layer == 2 and ours.config.vocab_size == 50257
    assert torch.allclose(ours(x).logits, theirs(x).logits, atol=1e-6)
    assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight  # tied head


def test_missing_weights_offline_stop_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(
        ConfigError, match=r"model.name_or_path=gpt2-medium: weights are not in the Hugging Face cache"
    ):
        model_config("gpt2-medium")
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize(
    "path, message", [("/no/such/model", "no such folder"), ("./outputs/x/hf_model", "no such folder")]
)
def test_bad_model_paths(path, message):
    with pytest.raises(ConfigError, match=message):
        model_config(path)


def test_folder_without_config(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        model_config(str(tmp_path))


def test_sampling_is_seeded_and_leaves_training_rng_alone(tiny_model_dir):
    model = build_model(name_or_path=str(tiny_model_dir)).train()
    prompt = torch.tensor([[464, 582]])
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = sample_tokens(model, prompt, max_new_tokens=12, seed=5)
    assert torch.equal(torch.rand(1), expected_next)  # the global generator did not move
    b = sample_tokens(model, prompt, max_new_tokens=12, seed=5)
    assert a.shape == (1, 12) and torch.equal(a, b)
    assert not (a == 50256).any()
    assert model.training  # restored


def test_sampling_under_model_compile_traces_no_graph(tiny_model_dir):
    """Generation runs eagerly even where model.compile is on: every new length is a new shape, so a compiled
    transformer would trace graph after graph as the cache grows. The same tokens as the model without compile."""
    traced = []

    def counting_backend(graph: torch.fx.GraphModule, inputs: list) -> object:
        traced.append(graph)
        return graph.forward

    torch._dynamo.reset()
    plain = build_model(name_or_path=str(tiny_model_dir))
    compiled = build_model(name_or_path=str(tiny_model_dir))
    # what model.compile does, with a backend that counts
    compiled.base_model.compile(backend=counting_backend)
    prompt = torch.tensor([[464, 582]])
    tokens = sample_tokens(compiled, prompt, max_new_tokens=6, seed=5)
    assert traced == [] and torch.equal(tokens, sample_tokens(plain, prompt, max_new_tokens=6, seed=5))
    compiled.eval()(prompt)  # outside generation the compiled transformer does trace (the backend counts)
    assert len(traced) >= 1


def test_end_of_text_ends_a_sample_only_when_it_is_not_banned(tiny_model_dir):
    """A model whose every next token is most likely end-of-text (its final norm always outputs the EOT
    embedding): with ban_eot=False the rows stop there, with ban_eot=True they run to the full length."""
    model = build_model(name_or_path=str(tiny_model_dir))
    with torch.no_grad():
        eot = model.transformer.wte.weight[50256]
        eot.mul_(50 / eot.norm())
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(eot)
    prompts = torch.tensor([[464], [582]])
    stopped = sample_tokens(model, prompts, max_new_tokens=12, seed=1, ban_eot=False)
    assert stopped.shape == (2, 1) and (stopped == 50256).all()
    banned = sample_tokens(model, prompts, max_new_tokens=12, seed=1, ban_eot=True)
    assert banned.shape == (2, 12) and not (banned == 50256).any()


def test_lr_schedules():
    warm = lr_lambda("constant", warmup_steps=4, max_steps=100)
    assert [warm(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = lr_lambda("cosine", warmup_steps=0, max_steps=100, min_lr_ratio=0.1)
    assert (
        cosine(0) == pytest.approx(1.0)
        and cosine(50) == pytest.approx(0.55)
        and cosine(100) == pytest.approx(0.1)
    )
    with pytest.raises(ConfigError, match="schedule.name=linear"):
        lr_lambda("linear", 0, 10)
