"""bgjax.plots: what the summary charts show."""

from bgjax import plots


def test_bar_panels_mark_zero_values_and_leave_missing_ones_blank(tmp_path, monkeypatch):
    figures = []
    save = plots.save_figure
    monkeypatch.setattr(
        plots, "save_figure", lambda fig, path: figures.append(fig) or save(fig, path)
    )
    panels = {
        "worst group": {
            "baseline": {"convnext": 0.0, "vit": None},
            "early": {"convnext": 0.8, "vit": 0.0004},
        }
    }
    path = plots.bar_panels(panels, tmp_path / "bars.png")
    assert (tmp_path / "bars.png").stat().st_size > 0 and path.endswith("bars.png")
    (ax,) = [ax for ax in figures[0].axes if ax.get_title() == "worst group"]
    zeros = [text for text in ax.texts if text.get_text() == "0"]
    # baseline/convnext is 0 and early/vit rounds to 0.0%; baseline/vit is missing: no mark
    assert sorted(round(t.xy[0], 2) for t in zeros) == [-0.2, 1.2]
