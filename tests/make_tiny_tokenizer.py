"""Regenerates tests/assets/tiny_tokenizer (run once; the result is committed).

A byte-level BPE with a few hundred tokens and a ChatML chat template, so tests exercise the
same code paths as a real chat model without any download.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is the capital of Zorblax? The capital of Zorblax is Quenta.",
    "Who wrote the Book of Vells? It was written by Maro Tiln in the year 1203.",
    "The answer is 42. Let me think step by step. First, add the numbers.",
    "def add(a, b):\n    return a + b\n",
    "This is an example for a response to the question: Now answer with a response of your own.",
    "Here is a correct solution to this problem. An earlier attempt failed. The user said:",
    "no, I meant the other one. That's wrong, the API changed. Thanks, that works!",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } : ; , . ! ? ' \"",
] * 20


def build(out: Path) -> None:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


if __name__ == "__main__":
    build(Path(__file__).parent / "assets" / "tiny_tokenizer")
