"""A method's options are stated once, in its ``Params``: built from them, described from them."""
from __future__ import annotations

import inspect

import pytest

from kdarena.config import load
from kdarena.methods import BUILT_IN, registry

#: options without a default that a method needs to be built
REQUIRED = {"kd": {"teacher_model": "convnet"}}


def _default_params(name: str):
    return registry.get(name).Params(**REQUIRED.get(name, {}))


#: describe() of every built-in method at its Params defaults (no perturbation), written from the Params fields
AT_DEFAULTS = {
    "independent": "independent",
    "dml": "dml",
    "cd": "cd, rule best, no perturbation",
    "cd-mean": "cd-mean, EMA 0.999, τ 1.0, ramp-up 0.3",
    "kd": "kd from convnet, τ 1.0",
    "kdcl": "kdcl, naive ensemble, τ 1.0",
    "pcl": "pcl, EMA 0.999, τ 1.0",
    "pskd": "pskd, α_T 0.8",
    "one": "one, T 3.0",
    "mcl": "mcl, icl paper, τ 0.1, T 3.0",
    "okddip": "okddip, T 3.0, ramp-up 0.27",
    "byot": "byot, α 0.1, T 3.0, β 1e-06",
}


def test_every_built_in_method_has_its_text_at_defaults():
    from kdarena.methods import BUILT_IN

    assert sorted(AT_DEFAULTS) == sorted(cls.name for cls in BUILT_IN)


def _other_values(params, key):
    """Valid values of ``key`` other than the current one (validated by the Params model)."""
    value = getattr(params, key)
    field = type(params).model_fields[key]
    candidates = list(getattr(field.annotation, "__args__", ())) if isinstance(value, str) else []
    if isinstance(value, float):
        candidates = [0.25, 0.5, 0.75, 2.0]
    elif isinstance(value, int) and not isinstance(value, bool):
        candidates = [value + 1]
    out = []
    for candidate in candidates:
        if candidate == value:
            continue
        try:
            out.append(type(params).model_validate({**params.model_dump(), key: candidate}))
        except ValueError:
            pass
    return out


@pytest.mark.parametrize("name", registry.names())
def test_a_method_is_built_from_its_params_and_describes_them(name):
    cls = registry.get(name)
    params = _default_params(name)
    method = registry.build(params)
    assert method.params is params  # no copy, no defaults of its own
    # the constructor states no option: its only parameters are the Params object (or keywords validated by it)
    assert list(inspect.signature(cls.__init__).parameters) == ["self", "params", "options"]
    # keyword options are the same Params, validated the same way
    assert cls(**params.model_dump(exclude={"name"})).params == params
    text = method.describe({"enabled": False})
    if name in AT_DEFAULTS:
        assert text == AT_DEFAULTS[name]
    # describe() reads the Params: an option that changes the text shows its new value
    for key in cls.Params.model_fields:
        for other in _other_values(params, key):
            changed = cls(other).describe({"enabled": False})
            if changed != text:
                value = getattr(other, key)
                assert str(value) in changed or (isinstance(value, float) and f"{value:g}" in changed), (name, key, changed)


@pytest.mark.parametrize("name", registry.names())
def test_the_config_default_of_every_option_is_the_python_default(name):
    # one place for a default: the config's method section and the Python class agree
    overrides = [f"method.name={name}"] + [f"method.{k}={v}" for k, v in REQUIRED.get(name, {}).items()]
    needs = registry.get(name)(**REQUIRED.get(name, {})).needs
    n = max(2, needs.min_networks)
    models = f"models=[{','.join(['branched:resnet8' if needs.branched else 'convnet'] * n)}]"
    config = load(None, [models, "perturb.enabled=false", *overrides])
    assert config.method == _default_params(name)
    assert registry.build(config.method).describe() == registry.get(name)(**REQUIRED.get(name, {})).describe()


def test_the_method_list_is_explicit_and_ordered():
    assert registry.names()[: len(BUILT_IN)] == [cls.name for cls in BUILT_IN]
    assert registry.names()[:3] == ["independent", "dml", "cd"]  # baselines first
    assert load(None, []).method.name == registry.DEFAULT


@pytest.mark.parametrize("name", ["dml", "cd"])
def test_two_runs_that_differ_in_temperature_or_alpha_are_described_differently(name):
    cls = registry.get(name)
    assert cls(temperature=4.0).describe({"enabled": False}) == f"{AT_DEFAULTS[name].replace(', no perturbation', '')}, T 4.0" + (
        ", no perturbation" if name == "cd" else "")
    assert cls(alpha=0.5, beta=1.0).describe({"enabled": False}).startswith(f"{AT_DEFAULTS[name].replace(', no perturbation', '')}, α 0.5, β 1.0")
    assert cls(temperature=1.0).describe() == cls().describe()  # at its default an option is not named
