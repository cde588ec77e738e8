"""Straight re-implementations of the published decoding loops, for the faithfulness tests.

Each module restates one upstream loop from its published algorithm (the source is named in
its docstring), keeping its control flow, its schedule arithmetic (dtypes included) and its
handling of edge cases such as a predicted mask id. The only changes are the ones a test
harness needs, each said where it is made: a ``model`` callable in place of the family's
remote code, noise hooks (``*_fn`` arguments) so a test can feed the draws ddiff makes, and
greedy decoding where the published code cannot run at temperature 0.
"""
