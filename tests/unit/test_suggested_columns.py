"""job.shapes.suggested_columns: the data.columns that read a row fitting no shape as an alpaca row, from the
names data sets give their columns; and only close spellings taken for a misspelt field."""
import pytest

from job import shapes


@pytest.mark.parametrize("row, columns", [
    ({"question": "2+2?", "answer": "4"}, {"instruction": "question", "output": "answer"}),  # GSM8K
    ({"Question": "2+2?", "Answer": "4"}, {"instruction": "Question", "output": "Answer"}),  # a spreadsheet's
    ({"instruction": "Sum.", "context": "2 2", "response": "4", "category": "qa"},
     {"output": "response", "input": "context"}),  # Dolly
    ({"query": "2+2?", "response": "4", "type": "GSM"}, {"instruction": "query", "output": "response"}),  # MetaMathQA
    ({"prompt": "2+2?", "response": "4"}, {"instruction": "prompt", "output": "response"}),
    ({"input": "2+2?", "output": "4"}, {"instruction": "input"}),
    ({"problem": "2+2?", "solution": "4"}, {"instruction": "problem", "output": "solution"}),
    ({"source": "Hej", "target": "Hello"}, {"instruction": "source", "output": "target"}),
])
def test_common_column_names_are_read_as_an_alpaca_row(row, columns):
    assert shapes.suggested_columns(row) == columns
    assert shapes.detect(shapes.renamed(row, columns)) == "alpaca"
    assert f"data.columns {columns}".replace("'", '"') in shapes.columns_hint(row)


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "user", "content": "hi"}]},  # fits a shape already
    {"prompt": "2+2?", "completion": "4"},
    {"left": "a", "right": "b"},  # names that say nothing
    {"question": "2+2?"},  # no answer
    {"answer": "4", "response": "4"},  # no question
])
def test_no_columns_are_suggested_where_the_names_say_nothing_or_a_shape_fits(row):
    assert shapes.suggested_columns(row) is None


def test_a_close_spelling_is_a_misspelt_field_and_a_distant_one_is_not():
    assert shapes.meant("inptu") == "input" and shapes.meant("mesages") == "messages"
    assert shapes.meant("answer") is None  # not 'assert'
