"""params.yaml to typed config: defaults, the repository file, one clear error per mistake."""

from pathlib import Path

import pytest
import yaml

from rlhf_core.config import Params, ParamsError, load_params, parse_params

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_repository_params_file_is_valid_and_complete():
    params = load_params(REPO_PARAMS)
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    # Every documented section is written out in the file, so users see each knob.
    assert set(raw) == set(Params.model_fields)
    assert params.model.trust_remote_code is False
    assert (
        params.data.validation.min_valid_fraction == raw["data"]["validation"]["min_valid_fraction"]
    )


def test_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("")
    assert load_params(path) == Params()


def test_unknown_key_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  tiny_confg: demo\n")
    with pytest.raises(ParamsError, match=r"model\.tiny_confg: unknown key"):
        load_params(path)


def test_unknown_key_inside_a_library_dataclass_section_is_an_error():
    with pytest.raises(ParamsError, match=r"data\.validation\.max_charz"):
        parse_params({"data": {"validation": {"max_charz": 10}}})
    with pytest.raises(ParamsError, match=r"demo\.not_a_knob"):
        parse_params({"demo": {"not_a_knob": 1}})


def test_wrong_type_and_range_are_errors():
    with pytest.raises(ParamsError, match=r"model\.tokenizer_vocab_size"):
        parse_params({"model": {"tokenizer_vocab_size": "big"}})
    with pytest.raises(ParamsError, match=r"data\.eval_fraction"):
        parse_params({"data": {"eval_fraction": 1.5}})
    with pytest.raises(ParamsError, match=r"data\.source"):
        parse_params({"data": {"source": "s3"}})


def test_missing_file_and_bad_yaml_are_clear_errors(tmp_path):
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(scalar)


def test_values_override_defaults():
    params = parse_params({"demo": {"seed": 7}, "data": {"validation": {"max_chars": 99}}})
    assert params.demo.seed == 7
    assert params.data.validation.max_chars == 99
    assert params.model == Params().model


def test_params_survive_dvcs_yaml_rewrite(tmp_path):
    """`dvc exp run -S` rewrites params.yaml with a YAML 1.2 writer (ruamel) that leaves
    strings such as `no` unquoted; PyYAML (YAML 1.1) must still read back the same values."""
    from ruamel.yaml import YAML

    writer = YAML()
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    rewritten = tmp_path / "params.yaml"
    with open(rewritten, "w") as handle:
        writer.dump(raw, handle)
    assert load_params(rewritten) == load_params(REPO_PARAMS)


def test_validation_token_limit_follows_the_stages_max_length():
    params = parse_params(
        {
            "sft": {"max_length": 128},
            "reward": {"max_length": 300},
            "policy": {"dpo": {"max_length": 200}},
        }
    )
    assert params.data.validation.max_tokens is None
    limits = {
        kind: params.validation_for(kind).max_tokens
        for kind in ("sft", "preference", "ranked", "prompts")
    }
    # each set: the shortest max_length among the stages training on it (each truncates)
    assert limits == {"sft": 128, "preference": 200, "ranked": 300, "prompts": 300}
    with pytest.raises(ValueError, match="unknown data set kind"):
        params.validation_for("pairs")


def test_validation_token_limit_set_in_params_wins():
    params = parse_params({"data": {"validation": {"max_tokens": 64}}, "sft": {"max_length": 128}})
    assert params.validation_for("sft").max_tokens == 64


@pytest.mark.parametrize("text", [".inf", ".nan", "-.inf"])
def test_nan_and_infinity_are_errors_naming_every_key(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(
        f"sft:\n  train:\n    learning_rate: {text}\n"
        f"policy:\n  dpo:\n    beta: {text}\n"
        f"evaluate:\n  best_of_n: [2, {text}]\n"
    )
    with pytest.raises(ParamsError) as error:
        load_params(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    for key in ("sft.train.learning_rate", "policy.dpo.beta", "evaluate.best_of_n[1]"):
        assert key in message
    assert "finite" in message
    # Finite values of the same keys are fine.
    parse_params({"sft": {"train": {"learning_rate": 1e-4}}, "policy": {"dpo": {"beta": 0.1}}})
