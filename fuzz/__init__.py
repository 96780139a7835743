"""Fuzzing of every py-hast parser that reads untrusted bytes (issue 6, item 2).

``fuzz/targets/<name>.py`` holds one target per parser; each exposes ``one_input(data)``,
which raises only the parser's documented rejection exceptions (``EXPECTED``) -- anything
else, and every :class:`fuzz.common.Finding` (a broken invariant: an answer the server should
have given, a byte written to a provider by a rejected message, an implementation that
disagrees with the spec's reference decoder), is a finding.  ``fuzz/run.py`` drives them with
atheris (coverage-guided) or hypothesis; ``tests/test_fuzz.py`` is the CI subset.
"""
