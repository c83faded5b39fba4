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


def test_gpu_gets_the_latency_hiding_scheduler_and_tpu_nothing(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    xla_options._gpu_options.cache_clear()
    assert xla_options.compiler_options("gpu") == xla_options._GPU_OPTIONS
    assert xla_options.compiler_options("tpu") is None


def test_compilation_cache_respects_a_configured_directory(monkeypatch, tmp_path):
    configured = jax.config.jax_compilation_cache_dir
    update = jax.config.update
    updates = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    if configured is None:  # unless the environment running the tests set one
        xla_options.enable_compilation_cache(str(tmp_path))
        assert updates == [("jax_compilation_cache_dir", str(tmp_path))]
    updates.clear()
    update("jax_compilation_cache_dir", "/user/set")  # nothing compiles before it is reset
    try:
        assert xla_options.enable_compilation_cache(str(tmp_path)) == "/user/set"
    finally:
        update("jax_compilation_cache_dir", configured)
    assert updates == []  # a user's JAX_COMPILATION_CACHE_DIR / jax.config is kept
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert xla_options.default_cache_dir() == str(tmp_path / "bgjax" / "jax")


def test_step_profiler_traces_its_window(tmp_path):
    step = jax.jit(lambda x: x + 1)
    profiler = xla_options.StepProfiler((2, 3), tmp_path / "profile")
    state = jnp.zeros(4)
    for i in range(1, 6):
        profiler.before_step(i, state)
        assert profiler.active == (2 <= i <= 3)
        state = step(state)
        profiler.after_step(i, state)
    profiler.close()
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert not xla_options.StepProfiler((), tmp_path).active  # () = no profile
    with pytest.raises(ValueError, match="profile_steps"):
        xla_options.StepProfiler((3, 2), tmp_path)


def test_gpu_option_names_are_known_to_this_jaxlib():
    """Each GPU option is a DebugOptions field this jaxlib accepts (an XLA:CPU compile takes
    and ignores GPU fields; a misspelt or removed one fails). Its effect needs a GPU."""
    options = xla_options._GPU_OPTIONS
    assert xla_options.supported(options, "", "XLA:GPU") == options
    assert xla_options.supported({"xla_gpu_no_such_option": True}, "", "XLA:GPU") is None
    flag = "--xla_gpu_enable_latency_hiding_scheduler=false"
    assert xla_options.supported(options, flag, "XLA:GPU") is None  # the user's XLA_FLAGS win
