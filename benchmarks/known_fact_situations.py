"""How often the bare base model carries a fact it knows into a question that uses it. Prints numbers; asserts nothing.

    python benchmarks/known_fact_situations.py

`world_facts` asks each learned fact three ways; the "situation" kind puts it inside an everyday
request ("I am flying to the capital of Korravel next week. Which city should I book a hotel
in?"). Its ceiling is the teacher, which reads the fact from its prompt. This script asks what the
model does with knowledge it already holds in its weights: ten real-world facts, each asked
directly and inside a situation written the way the benchmark writes them, answered greedily
(40 new tokens) by the built-in SmolLM2-135M-Instruct without any adapter. A fact counts where
the answer contains one of its words (case ignored). The line that matters is how many of the
facts answered directly also reach their situation question.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_name  # noqa: E402

# (direct question, the same fact used in a situation, words that make an answer right)
FACTS = [
    ("What is the capital of France?",
     "I am flying to the capital of France next week. Which city should I book a hotel in?", ["paris"]),
    ("How many days are in a week?",
     "I am filling in a school worksheet about the calendar. What number should I write in the box labelled "
     "'days in a week'?", ["7", "seven"]),
    ("In what year did the United States declare independence?",
     "The United States is issuing a commemorative coin showing the year the country declared independence. "
     "Which year should be stamped on the coin?", ["1776"]),
    ("Who was the first president of the United States?",
     "A statue of the first president of the United States stands in the town square. Whose name is carved "
     "on its base?", ["washington"]),
    ("What colours are on the flag of Japan?",
     "I am sewing a Japanese flag for a school parade. What colours of fabric do I need to buy?", ["red"]),
    ("What is the capital of Italy?",
     "My cousin is moving to the capital of Italy for work. Which city is she moving to?", ["rome"]),
    ("Who wrote Romeo and Juliet?",
     "My class is reading Romeo and Juliet. Whose name should I write as the author on my report?", ["shakespeare"]),
    ("What is the largest planet in our solar system?",
     "I am painting the largest planet of our solar system for a science fair. Which planet am I painting?",
     ["jupiter"]),
    ("What is the chemical symbol for gold?",
     "I am labelling a jar of gold in a chemistry lab. Which chemical symbol should go on the label?", ["au"]),
    ("Which planet is known as the Red Planet?",
     "A rover is being sent to the Red Planet. Which planet is it travelling to?", ["mars"]),
]


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdcli.models.builtin_model import ensure_builtin_model

    torch.set_num_threads(2)
    folder = ensure_builtin_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def answer(question: str) -> str:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
        return tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')} on {cpu_name()}; built-in SmolLM2-135M-Instruct, greedy, no adapter")
    direct_right = carried = 0
    for direct, situation, words in FACTS:
        a, b = answer(direct), answer(situation)
        knows = any(w in a.lower() for w in words)
        uses = any(w in b.lower() for w in words)
        direct_right += knows
        carried += knows and uses
        print(f"{int(knows)} {direct}\n    {a[:90]!r}\n{int(uses)} {situation}\n    {b[:90]!r}")
    print(f"direct right: {direct_right} of {len(FACTS)}; of those, reached in their situation: {carried} of {direct_right}")


if __name__ == "__main__":
    main()
