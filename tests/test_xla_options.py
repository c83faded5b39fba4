"""Per-executable XLA:CPU options: what they change, and when they stay out of the way."""

import jax
import jax.numpy as jnp
import pytest

from bgjax import xla_options

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compiler options")


@pytest.fixture(autouse=True)
def fresh_cache():
    xla_options._cpu_options.cache_clear()
    yield
    xla_options._cpu_options.cache_clear()


def _compiled_text(options):
    x = jnp.ones((64, 96), jnp.float32)
    return jax.jit(lambda x: x @ x.T, compiler_options=options).lower(x).compile().as_text()


def test_cpu_options_route_matrix_products_away_from_ynnpack(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = xla_options.compiler_options()
    assert set(options) == set(xla_options._CPU_OPTIONS)
    assert "ynn_fusion" in _compiled_text(None)  # XLA's default: the dot is a YNNPACK fusion
    assert "ynn_fusion" not in _compiled_text(options)


def test_options_set_in_xla_flags_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_prefer_vector_width=256")
    assert set(xla_options.compiler_options()) == {"xla_cpu_experimental_ynn_fusion_type"}
    flags = " ".join(f"--{k}=x" for k in xla_options._CPU_OPTIONS)
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert xla_options.compiler_options() is None


def test_unknown_options_are_dropped_with_a_warning(monkeypatch, caplog):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(xla_options, "_CPU_OPTIONS", {"xla_cpu_no_such_option": 1})
    assert xla_options.compiler_options() is None
    assert "xla_cpu_no_such_option" in caplog.text


def test_no_options_for_accelerators():
    assert xla_options.compiler_options("gpu") is None
    assert xla_options.compiler_options("tpu") is None
