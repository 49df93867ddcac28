"""classify.py: Figure 3's prompt over the paper's three categories and over others."""

import classify


def test_classification_prompt_matches_the_paper():
    # the paper's Figure 3 (§3.2 A), with the "..." completed from the reference code
    prompt = classify.classification_prompt()
    assert prompt.startswith("Analyze the given question and classify it into one of four categories: "
                             "'code', 'math', 'reasoning', or 'others'. Follow these guidelines:\n\n1. Code: ")
    assert prompt.endswith("Format your response as follows:\nClassification: `\\boxed{category}`")
    assert "..." not in prompt


def test_classification_prompt_with_a_fourth_category():
    prompt = classify.classification_prompt(("math", "code", "medicine", "reasoning"))
    assert prompt.startswith("Analyze the given question and classify it into one of five categories: "
                             "'code', 'math', 'medicine', 'reasoning', or 'others'. Follow these guidelines:\n\n1. Code: ")
    assert "\n3. Medicine: Questions about medicine.\n4. Reasoning: " in prompt and "\n5. Others: " in prompt
    assert classify.parse_category("\\boxed{Medicine}", categories=("code", "medicine")) == "medicine"
    assert classify.parse_category("\\boxed{math}", categories=("code", "medicine")) is None  # not a category here
    assert classify.parse_category("it is about medicine", strict=False, categories=("code", "medicine")) == "medicine"
