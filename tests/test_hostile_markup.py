"""Markup in file names and labels never breaks a generated page: data inside <script> is
escaped for that context (`<` as \\u003c), and templates substitute in one pass."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from test_explorer import _tiny_bundle, dump_dom, needs_chromium, page_data, run_selftest

from vitcli.services import explorer

HOSTILE = "<!--<script>"


def test_script_json_has_no_markup_and_reads_back_the_same():
    data = {"title": f"{HOSTILE}</script><b>&amp;\u2028", "labels": [HOSTILE, "{{DATA}}"]}
    text = explorer.script_json(data)
    assert not set("<>&\u2028\u2029") & set(text)
    assert json.loads(text) == data


def test_templates_substitute_in_one_pass():
    template = "<title>{{TITLE}}</title><script>{{DATA}}</script>"
    page = explorer.fill_template(template, {"{{TITLE}}": "{{DATA}}.jpg", "{{DATA}}": "[1]"})
    assert page == "<title>{{DATA}}.jpg</title><script>[1]</script>"


def test_a_file_named_like_the_data_placeholder_keeps_a_short_title(tmp_path, examples_dir):
    image = tmp_path / "{{DATA}}.jpg"
    shutil.copy(examples_dir / "coffee.png", image)
    page = explorer.explore_image(_tiny_bundle((32, 32)), image, tmp_path / "p.html").path
    title = re.search(r"<title>(.*?)</title>", page.read_text(), re.S)
    assert title and title.group(1).startswith("{{DATA}}.jpg") and len(title.group(1)) < 100
    assert page_data(page)["title"] == "{{DATA}}.jpg"


def hostile_page(tmp_path, examples_dir):
    image = tmp_path / f"{HOSTILE}.jpg"
    shutil.copy(examples_dir / "coffee.png", image)
    bundle = _tiny_bundle((32, 32))
    bundle.labels[0] = HOSTILE  # the model's own label, too
    bundle.labels[1] = "{{TITLE}}"
    return explorer.explore_image(bundle, image, tmp_path / "p.html").path


def test_markup_in_names_and_labels_stays_inside_its_strings(tmp_path, examples_dir):
    page = hostile_page(tmp_path, examples_dir)
    text = page.read_text()
    script = re.search(r'<script id="explorer-data"[^>]*>(.*?)</script>', text, re.S)
    assert script and "<" not in script.group(1)
    data = page_data(page)
    assert data["title"] == f"{HOSTILE}.jpg"
    assert HOSTILE in json.dumps(data["predictions"])


@needs_chromium
@pytest.mark.slow
def test_the_page_script_still_runs_with_a_hostile_name_and_label(tmp_path, examples_dir):
    page = hostile_page(tmp_path, examples_dir)
    assert run_selftest(page, tmp_path)["ok"] is True
    dom, _ = dump_dom(page, "", tmp_path)
    heading = re.search(r'<h1 id="title"[^>]*>(.*?)</h1>', dom, re.S)
    assert heading and "&lt;!--&lt;script&gt;.jpg" in heading.group(1)
