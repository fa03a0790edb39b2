"""Dataset readers on small excerpts of the real files in ../shared/datasets (cut at test time, never copied
into the repo), and malformed lines that must fail with an error naming the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.bundles.manifest import HeadType
from service.training.readers import (
    DatasetError,
    QAExample,
    TableColumns,
    read_conll,
    read_dataset,
    read_squad,
    split_by_article,
    split_holdout,
)
from tests.conftest import DATASETS

pytestmark = pytest.mark.skipif(not DATASETS.is_dir(), reason="../shared/datasets is not present")

CLS, REG, MULTI = HeadType.CLASSIFICATION, HeadType.REGRESSION, HeadType.MULTILABEL


def excerpt(tmp_path: Path, rel: str, lines: int, extra: str = "") -> Path:
    """The first `lines` lines of a shared dataset file (+ `extra`), written under tmp_path."""
    src = DATASETS / rel
    with src.open(encoding="utf-8") as fh:
        head = [next(fh) for _ in range(lines)]
    out = tmp_path / Path(rel).name
    out.write_text("".join(head) + extra, encoding="utf-8")
    return out


# --- TSV / CSV / JSONL -------------------------------------------------------------------------


def test_tsv_sst2_reads_sentences_and_labels(tmp_path):
    examples = read_dataset(excerpt(tmp_path, "sst2/train.tsv", 21), CLS)
    assert len(examples) == 20
    assert examples[0].text == "hide new secretions from the parental units"  # trailing space stripped
    assert examples[0].label == "0" and examples[0].pair is None and examples[0].line == 2
    assert {e.label for e in examples} == {"0", "1"}


def test_tsv_mrpc_finds_the_sentence_pair_and_quality_label(tmp_path):
    examples = read_dataset(excerpt(tmp_path, "mrpc/train.tsv", 11), CLS)
    assert len(examples) == 10
    first = examples[0]
    assert first.text.startswith("Amrozi accused his brother") and first.pair.startswith("Referring to him")
    assert first.label == "1"


def test_tsv_keeps_unbalanced_quotes_as_text(tmp_path):
    examples = read_dataset(excerpt(tmp_path, "mrpc/dev.tsv", 3), CLS)
    assert examples[0].pair.startswith('"The foodservice pie business')


def test_tsv_stsb_reads_float_scores_for_regression(tmp_path):
    examples = read_dataset(excerpt(tmp_path, "stsb/train.tsv", 6), REG)
    assert [e.score for e in examples][:2] == [5.0, 3.8]
    assert examples[0].text == "A plane is taking off." and examples[0].pair == "An air plane is taking off."


def test_tsv_ag_news_label_column_by_name(tmp_path):
    examples = read_dataset(excerpt(tmp_path, "ag_news/train.tsv", 9), CLS, TableColumns(label="label_name"))
    assert examples[0].label == "Sci/Tech" and examples[0].text.startswith("p2pnet.net News")


def test_tsv_without_header_uses_column_indices(tmp_path):
    path = excerpt(tmp_path, "cola/dev.tsv", 5)
    examples = read_dataset(path, CLS, TableColumns(text="3", label="1", header=False))
    assert len(examples) == 5 and examples[0].text == "The sailors rode the breeze clear of the rocks."
    assert examples[0].line == 1
    with pytest.raises(DatasetError, match="has no header"):
        read_dataset(path, CLS, TableColumns(text="sentence", header=False))


def test_csv_ag_news_quoted_fields_without_header(tmp_path):
    path = excerpt(tmp_path, "ag_news/test.csv", 4)
    examples = read_dataset(path, CLS, TableColumns(text="1", pair="2", label="0", header=False))
    assert len(examples) == 4
    assert examples[0].text == "Fears for T N pension after talks" and examples[0].label == "3"
    assert examples[0].pair.startswith("Unions representing workers")


def test_jsonl_text_pair_label_and_multilabel_lists(tmp_path):
    rows = read_dataset(excerpt(tmp_path, "sst2/dev.tsv", 6), CLS)
    path = tmp_path / "sst2.jsonl"
    path.write_text("".join(json.dumps({"text": r.text, "label": int(r.label)}) + "\n" for r in rows))
    assert [(e.text, e.label) for e in read_dataset(path, CLS)] == [(r.text, r.label) for r in rows]

    multi = tmp_path / "multi.jsonl"
    multi.write_text(json.dumps({"text": rows[0].text, "labels": ["a", "b"]}) + "\n\n"
                     + json.dumps({"text": rows[1].text, "text_pair": "x", "labels": []}) + "\n")
    got = read_dataset(multi, MULTI)
    assert got[0].labels == ("a", "b") and got[1].labels == () and got[1].pair == "x" and got[1].line == 3


def test_multilabel_cells_split_on_the_separator(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("text\tlabels\nsome text\tsports|tech\nother\t\n")
    got = read_dataset(path, MULTI, TableColumns(label_sep="|"))
    assert got[0].labels == ("sports", "tech") and got[1].labels == ()


# --- malformed tables ----------------------------------------------------------------------------


def test_tsv_line_with_a_missing_column_names_file_and_line(tmp_path):
    path = excerpt(tmp_path, "sst2/train.tsv", 5, extra="a sentence without its label\n")
    with pytest.raises(DatasetError) as err:
        read_dataset(path, CLS)
    assert f"{path}:6:" in str(err.value) and "expected 2 tab-separated columns, found 1" in str(err.value)
    assert err.value.line == 6


def test_regression_score_that_is_not_a_number(tmp_path):
    bad = "9999\tx\tx\t2012\t0\tnone\tnone\tA cat.\tA dog.\thigh\n"
    path = excerpt(tmp_path, "stsb/train.tsv", 4, extra=bad)
    with pytest.raises(DatasetError, match=rf"{path}:5: score 'high' is not a number"):
        read_dataset(path, REG)


def test_empty_text_and_unknown_column(tmp_path):
    path = excerpt(tmp_path, "sst2/dev.tsv", 3, extra=" \t1\n")
    with pytest.raises(DatasetError, match=rf"{path}:4: empty text"):
        read_dataset(path, CLS)
    with pytest.raises(DatasetError, match="no column 'review'"):
        read_dataset(path, CLS, TableColumns(text="review"))


def test_jsonl_invalid_line_and_missing_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "label": 1}\n{"text": "broken", "label": \n')
    with pytest.raises(DatasetError, match=rf"{path}:2: invalid JSON"):
        read_dataset(path, CLS)
    path.write_text('{"text": "fine", "label": 1}\n{"sentence": "no label here"}\n')
    with pytest.raises(DatasetError, match=rf"{path}:2: no label field"):
        read_dataset(path, CLS)


def test_csv_row_too_short(tmp_path):
    path = excerpt(tmp_path, "ag_news/test.csv", 2, extra='"2"\n')
    with pytest.raises(DatasetError, match=rf"{path}:3: expected at least 3 columns"):
        read_dataset(path, CLS, TableColumns(text="2", label="0", header=False))


# --- CoNLL ---------------------------------------------------------------------------------------


def test_conll_excerpt_sentences_tags_and_docstart(tmp_path):
    sentences = list(read_conll(excerpt(tmp_path, "conll2003/train.txt", 40)))
    assert sentences[0].tokens[:3] == ("EU", "rejects", "German")
    assert sentences[0].tags[:3] == ("B-ORG", "O", "B-MISC") and sentences[0].line == 3
    assert sentences[1].tokens == ("Peter", "Blackburn") and sentences[1].tags == ("B-PER", "I-PER")
    assert sentences[0].text == "EU rejects German call to boycott British lamb ."
    assert all("-DOCSTART-" not in s.tokens for s in sentences)
    assert read_dataset(tmp_path / "train.txt", HeadType.TOKEN_CLASSIFICATION) == sentences


def test_conll_malformed_lines(tmp_path):
    path = excerpt(tmp_path, "conll2003/test.txt", 6, extra="JAPAN\n")
    with pytest.raises(DatasetError, match=rf"{path}:7: expected 'word \.\.\. TAG'"):
        list(read_conll(path))
    path = excerpt(tmp_path, "conll2003/test.txt", 6, extra="JAPAN NNP B-NP LOC\n")
    with pytest.raises(DatasetError, match=rf"{path}:7: tag 'LOC' is not IOB2"):
        list(read_conll(path))


# --- SQuAD ---------------------------------------------------------------------------------------


def squad_excerpt(tmp_path: Path, articles: int = 2) -> Path:
    doc = json.loads((DATASETS / "squad/dev_subset_xquad_en.json").read_text())
    doc["data"] = doc["data"][:articles]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def test_squad_excerpt_questions_contexts_and_answers(tmp_path):
    examples = read_dataset(squad_excerpt(tmp_path), HeadType.QA)
    assert all(isinstance(e, QAExample) for e in examples)
    first = examples[0]
    assert first.title == "Super_Bowl_50" and first.question == "How many points did the Panthers defense surrender?"
    text, start = first.answers[0]
    assert first.context[start : start + len(text)] == text == "308"
    assert len({e.title for e in examples}) == 2


def test_squad_answer_that_is_not_in_the_context(tmp_path):
    path = squad_excerpt(tmp_path, 1)
    doc = json.loads(path.read_text())
    doc["data"][0]["paragraphs"][1]["qas"][2]["answers"][0]["answer_start"] += 3
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"squad.json:data\[0\]\.paragraphs\[1\]\.qas\[2\]\.answers\[0\]: answer"):
        list(read_squad(path))


def test_squad_invalid_json_names_the_line(tmp_path):
    path = squad_excerpt(tmp_path, 1)
    lines = path.read_text().splitlines()
    lines[10] = lines[10] + ","  # a stray comma
    path.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=rf"{path}:1[01]: invalid JSON"):
        list(read_squad(path))


def test_split_by_article_is_seeded_and_disjoint():
    examples = list(read_squad(DATASETS / "squad/dev_subset_xquad_en.json"))
    train, held = split_by_article(examples, 8, seed=0)
    assert len(train) + len(held) == len(examples) == 1190
    assert len({e.title for e in held}) == 8 and not {e.title for e in held} & {e.title for e in train}
    again = split_by_article(examples, 8, seed=0)[1]
    assert [e.id for e in again] == [e.id for e in held]
    assert [e.id for e in split_by_article(examples, 8, seed=1)[1]] != [e.id for e in held]
    with pytest.raises(ValueError):
        split_by_article(examples, 48)


def test_split_holdout_is_seeded_disjoint_and_keeps_file_order(tmp_path):
    examples = list(read_dataset(excerpt(tmp_path, "sst2/train.tsv", 201), CLS))
    train, held = split_holdout(examples, 50, seed=0)
    assert len(train) == 150 and len(held) == 50
    assert sorted(map(id, train + held)) == sorted(map(id, examples))
    positions = {id(e): i for i, e in enumerate(examples)}
    assert [positions[id(e)] for e in held] == sorted(positions[id(e)] for e in held)
    assert [id(e) for e in split_holdout(examples, 50, seed=0)[1]] == [id(e) for e in held]
    assert [id(e) for e in split_holdout(examples, 50, seed=1)[1]] != [id(e) for e in held]
    with pytest.raises(ValueError):
        split_holdout(examples, 200)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_dataset(tmp_path / "nope.tsv", CLS)
    odd = tmp_path / "data.xyz"
    odd.write_text("x\n")
    with pytest.raises(DatasetError, match="pass --format"):
        read_dataset(odd, CLS)
