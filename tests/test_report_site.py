"""`lifelong report`: one self-contained HTML site over a real run, a bench and ledgers, opened in a real browser.

The site is built from tiny but real work: a `lifelong run` of two methods on the tiny stream, an edit bench of
GRACE on a tiny Llama, a vlm ledger with a learn change, and a diffusion ledger with a UCE erasure and its
revert. The browser test drives Debian's chromium through Playwright (no browser download); where either is
missing it skips and says how to get it.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from lifelong import api
from lifelong.cli import CONFIG_DIR, main
from lifelong.errors import ConfigError
from lifelong.ledger.core import Ledger

TINY_VLM = ["--model", "tiny-embedded", "--resolution", "32", "--trainable-blocks", "2", "--probe", "digits",
            "--probe", "lfw", "--probe-items", "20"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{kind: folder} of real (tiny) results and ledgers."""
    from lifelong.edit.bench import load_bench_config, run_bench
    from lifelong.families.lm import tiny_lm

    root = tmp_path_factory.mktemp("report-sources")
    assert main(["run", str(CONFIG_DIR / "tiny.yaml"), f"output_dir={root / 'runs'}", "methods=[finetune,lwf]",
                 "train.steps_per_task=3", "train.batch_size=8"]) == 0

    model, tok = tiny_lm("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8)
    model.save_pretrained(root / "tiny-llama")
    tok.save_pretrained(root / "tiny-llama")
    bench = run_bench(load_bench_config(None, [f"model={root / 'tiny-llama'}", "methods=[grace]", "T=[1, 2]",
                                               "single_n=0", f"output_dir={root / 'runs'}", "name=edits",
                                               "generation=false", "knobs={grace: {eps: 0.05, steps: 20}}"]))

    vlm = root / "vlm-ledger"
    assert main(["init", str(vlm), *TINY_VLM]) == 0
    assert main(["learn", str(vlm), "--task", "mnist", "--train-items", "40", "--test-items", "20", "--method", "lwf",
                 "train.steps_per_task=4", "train.batch_size=8"]) == 0

    t2i = root / "t2i-ledger"
    assert main(["init", str(t2i), "--family", "diffusion", "--model", "tiny-embedded", "--probe", "object/sneaker",
                 "--probe", "digit/7", "--probe-items", "3"]) == 0
    assert main(["erase", str(t2i), "--concept", "sneaker", "--method", "uce"]) == 0
    assert main(["revert", str(t2i), "1"]) == 0
    return {"learn": root / "runs" / "tiny", "edit-bench": bench, "vlm": vlm, "t2i": t2i, "runs": root / "runs"}


@pytest.fixture(scope="module")
def site_dir(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    index = api.report([sources["runs"], sources["vlm"], sources["t2i"]], out)
    assert index == out / "index.html"
    return out


def _pages(site_dir: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(site_dir.glob("*.html"))}


def test_the_site_has_a_page_per_run_and_ledger_and_links_nothing_outside(site_dir, sources):
    pages = _pages(site_dir)
    assert set(pages) == {"index", "tiny", "edits", "vlm-ledger", "t2i-ledger"}
    index = pages["index"].read_text()
    for name in ("tiny", "edits", "vlm-ledger", "t2i-ledger"):
        assert f'href="{name}.html"' in index
    for page in pages.values():
        text = page.read_text()
        # offline: no stylesheet, script or image is fetched from anywhere (every image is a data URI)
        assert not re.search(r'(src|href)="(https?:)?//', text), page.name
        assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'<img[^>]* src="([^"]+)"', text))
    # the diffusion ledger's page shows each probe concept's samples: base, after the erasure, after the revert
    t2i = pages["t2i-ledger"].read_text()
    assert t2i.count('<img class="strip"') == 2 + 2 * 2 + 2 * 2


def test_ledger_commands_refresh_and_print_the_ledgers_report(sources, tmp_path, capsys):
    vlm = shutil.copytree(sources["vlm"], tmp_path / "ledger")
    (vlm / "report.html").unlink()
    assert main(["revert", str(vlm), "1"]) == 0
    assert f"report: {vlm / 'report.html'}" in capsys.readouterr().out
    page = (vlm / "report.html").read_text()
    assert "2 revert 1" in page and 'id="interference"' in page


def test_report_refuses_a_folder_with_nothing_to_show(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither a ledger"):
        api.report([tmp_path / "empty"], tmp_path / "out")
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- in a real browser ---------------------------------------------------------------------------------------


def _chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright; it is in the dev extras)")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on PATH: install Debian's (sudo apt-get install chromium; `make setup` does as root)")
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, path: Path, shots: Path):
    """The page at `path` loaded; fails on any console error, page error, failed request or broken image."""
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length")
    page.screenshot(path=str(shots / f"{path.stem}.png"), full_page=True)
    assert not problems and broken == 0, (path.name, problems, broken)
    return page


def _table(page, selector: str) -> tuple[list[str], list[list[dict]]]:
    """(the headers' data-key, per body row its cells' {text, value, delta})."""
    return page.evaluate("""sel => {
        const t = document.querySelector(sel);
        const keys = Array.from(t.tHead.rows[0].cells).map(c => c.getAttribute("data-key") || c.textContent);
        const rows = Array.from(t.tBodies[0].rows).map(r => Array.from(r.cells).map(c => ({
            text: c.textContent, value: c.getAttribute("data-value"), delta: c.getAttribute("data-delta")})));
        return [keys, rows];
    }""", selector)


def test_every_page_opens_clean_and_the_index_links_work(browser, site_dir, tmp_path):
    index = _open(browser, site_dir / "index.html", tmp_path)
    names = index.eval_on_selector_all("#index tbody a", "links => links.map(a => a.textContent)")
    assert sorted(names) == ["edits", "t2i-ledger", "tiny", "vlm-ledger"]
    for name in names:
        index.click(f"#index a:text-is('{name}')")
        assert index.url.endswith(f"/{name}.html")
        index.go_back()
    for path in _pages(site_dir).values():
        _open(browser, path, tmp_path).close()
    assert len(list(tmp_path.glob("*.png"))) == 5  # a screenshot of every page


def test_the_tables_hold_the_numbers_of_their_json(browser, site_dir, sources, tmp_path):
    results = json.loads((sources["learn"] / "results.json").read_text())
    page = _open(browser, site_dir / "tiny.html", tmp_path)
    keys, rows = _table(page, "#metrics")
    assert keys[0] == "method" and {"last", "avg", "transfer"} <= set(keys)
    assert sorted(r[0]["text"] for r in rows) == sorted(results["methods"])
    for row in rows:
        method = results["methods"][row[0]["text"]]
        for key, cell in zip(keys[1:], row[1:]):
            assert float(cell["value"]) == pytest.approx(method[key], abs=1e-9), (key, cell)
    for label, method in results["methods"].items():  # the accuracy matrix heatmaps, cell by cell
        _, matrix = _table(page, f"#matrix-{label}")
        shown = [float(c["value"]) for r in matrix for c in r[1:]]
        assert shown == pytest.approx([a for row in method["accuracy_matrix"] for a in row])

    bench = json.loads((sources["edit-bench"] / "results.json").read_text())
    page = _open(browser, site_dir / "edits.html", tmp_path)
    keys, rows = _table(page, "#vs-T-reliability_token")
    assert keys[1:] == ["T=1", "T=2"]
    for row in rows:
        expected = [r["reliability_token"] for r in bench["methods"][row[0]["text"]]["lifelong"]]
        assert [float(c["value"]) for c in row[1:]] == pytest.approx(expected)

    ledger = Ledger.open(sources["t2i"])
    page = _open(browser, site_dir / "t2i-ledger.html", tmp_path)
    probes, rows = _table(page, "#interference")
    probes = probes[1:]
    assert [p.name for p in ledger.probes] == probes
    assert [float(c["value"]) for c in rows[0][1:]] == pytest.approx([ledger.manifest["baseline"][p] for p in probes])
    for change, row in zip(ledger.changes, rows[1:]):
        assert [float(c["value"]) for c in row[1:]] == pytest.approx([change["probes_after"][p] for p in probes])
        assert [float(c["delta"]) for c in row[1:]] == pytest.approx(
            [change["probes_after"][p] - change["probes_before"][p] for p in probes])
    keys, history = _table(page, "#history")
    assert [float(r[0]["value"]) for r in history] == [c["id"] for c in ledger.changes]
    for change, row in zip(ledger.changes, history):  # each change's cost
        cells = dict(zip(keys, row))
        assert float(cells["seconds"]["value"]) == pytest.approx(change["cost"]["wall_seconds"])
        assert float(cells["peak_rss_mb"]["value"]) == pytest.approx(change["cost"]["peak_rss_mb"])
        assert float(cells["patch_bytes"]["value"]) == change["cost"]["patch_bytes"]


def test_clicking_a_header_sorts_the_table(browser, site_dir, tmp_path):
    page = _open(browser, site_dir / "edits.html", tmp_path)
    keys, _ = _table(page, "#rows")
    column = keys.index("reliability_token")

    def values() -> list[float]:
        _, rows = _table(page, "#rows")
        return [float(r[column]["value"]) for r in rows if r[column]["value"] is not None]

    page.click("#rows th[data-key='reliability_token']")
    ascending = values()
    assert len(ascending) >= 3 and ascending == sorted(ascending)
    page.click("#rows th[data-key='reliability_token']")
    assert values() == sorted(ascending, reverse=True)
    assert page.get_attribute("#rows th[data-key='reliability_token']", "aria-sort") == "descending"
