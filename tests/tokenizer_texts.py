"""A fixed, varied set of texts for comparing tokenizers: prose in many scripts, code, numbers,
whitespace runs, contractions, and text that looks like special tokens. Deterministic."""

import random

FRAGMENTS = [
    "This is a test sentence.", "Hello, world!", "What is the capital of France?", "The quick brown fox jumps over the lazy dog.",
    "It's, they're, we've, I'm, you'll, he'd, SHE'S, THEY'LL", "Don't stop — keep going…", "“Quoted” ‘text’ «guillemets»",
    "café naïve résumé Ærøskøbing façade", "Größenwahnsinn und Straßenbahn", "¿Dónde está la biblioteca? ¡Aquí!",
    "日本語のテキストと中文字符を混ぜる", "这是一个测试句子。", "한국어 텍스트입니다", "Ελληνικά κείμενα", "Русский текст, ёжик.",
    "العربية نص تجريبي ٣٤٥", "עברית טקסט", "हिन्दी पाठ परीक्षण", "ภาษาไทยทดสอบ", "Tiếng Việt có dấu",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵", "math ∑ᵢ xᵢ² ≤ ∞, ½ ¾ ² ³", "\u00a0nbsp\u2003emspace\u200bzwsp", "tab\there",
    "def f(x):\n    return x**2 + 1  # comment\n", "for (int i = 0; i < 10; ++i) { sum += a[i]; }", "if x == 3:\n\tpass\n",
    "<html><body class=\"x\">Hi &amp; bye</body></html>", "SELECT * FROM users WHERE id = 42;", "fn main() { println!(\"{}\", 1); }",
    "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}", "https://example.com/a?b=c&d=e#frag", "user@example.org",
    "Prices: $1,234.56 and 7890 units; 3.14159", "2024-11-22T13:00:00Z", "1234567890123", "0x1F 0b1010 1e-5 -3.5e+10",
    "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>", "<|python_tag|>", "<|reserved_special_token_7|>",
    "<|im_start|>", "<|endoftext|>", "<|not_a_token|>", "<|eot_id", "|>", "<s>", "</s>", "[INST]", "<<SYS>>",
    "  leading spaces", "trailing spaces   ", "\n", "\n\n\n", " ", "   ", "\t\t", "\r\n", "mixed\r\nCRLF\r\n", " \n \n ",
    "a   12", "x  =  [1,2,3]", "    indented\n        more", "!!!???...", "___init___", "--flag=value", "C:\\Users\\name",
]  # fmt: skip
WHITESPACE = [" ", "  ", "   ", "    ", "\t", "\n", "\n\n", " \n", "\r\n", "        ", "\u3000", "\u00a0"]


def sample_texts(n: int = 240, seed: int = 0) -> list[str]:
    """The fragments themselves, then random joins of 2-5 fragments with random whitespace runs,
    sometimes cut at a random character (mid-word, mid-emoji-sequence): ``n`` texts in all."""
    rng = random.Random(seed)
    texts = ["", *FRAGMENTS]
    while len(texts) < n:
        parts = rng.sample(FRAGMENTS, rng.randint(2, 5))
        text = "".join(p + rng.choice(WHITESPACE) * rng.randint(1, 3) for p in parts)
        if rng.random() < 0.3:
            text = text[: rng.randint(1, len(text))]
        texts.append(text)
    return texts[:n]
