"""A chat turn whose content is a list of content parts (OpenAI's and transformers' multimodal message form, which
many Hub data sets use for text too) reads as the text its parts join to; a part that is not text is refused
naming the row's turn and part."""
import pytest

from job import shapes


def parts(*texts):
    return [{"type": "text", "text": text} for text in texts]


def test_text_parts_read_as_the_text_they_join_to():
    row = {"messages": [{"role": "system", "content": parts("Be terse.")},
                        {"role": "user", "content": parts("What is 2 ", "plus 2?")},
                        {"role": "assistant", "content": parts("4")}]}
    assert shapes.chat(row, "auto", None) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4"}]


def test_parts_and_strings_mix_in_one_conversation_and_in_sharegpt_rows():
    row = {"conversations": [{"from": "human", "value": parts("Hi")}, {"from": "gpt", "value": "Hello!"}]}
    assert shapes.chat(row, "auto", None) == [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello!"}]


@pytest.mark.parametrize("content, message", [
    ([{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": "http://x/a.png"}}],
     "messages turn 0 content part 1 is one of type 'image_url'; peftopt reads text parts only"),
    ([{"type": "image"}], "messages turn 0 content part 0 is one of type 'image'; peftopt reads text parts only"),
    (["plain string"], "messages turn 0 content part 0 is one that is not a text part"),
    ([{"type": "text", "text": 3}], "messages turn 0 content part 0 is a text part without a 'text' string"),
    ([], "messages turn 0 (user) is empty"),
])
def test_a_part_that_is_not_text_is_refused_naming_the_turn_and_part(content, message):
    row = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(shapes.BadRow, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        shapes.chat(row, "auto", None)
