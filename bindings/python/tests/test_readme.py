"""The README's Python example runs and prints what the README says it prints."""
import contextlib
import io
import os
import re
import unittest

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "README.md")


class Readme(unittest.TestCase):
    def test_example_output(self):
        with open(README, encoding="utf-8") as f:
            text = f.read()
        section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
        m = re.search(r"```python\n(.*?)```\n\nprints\n\n```text\n(.*?)```", section, re.S)
        self.assertIsNotNone(m, "no example with its output in README's Python section")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(m.group(1), "README.md:Python", "exec"), {"__name__": "readme"})
        self.assertEqual(out.getvalue(), m.group(2))


if __name__ == "__main__":
    unittest.main()
