"""Mutations of the evaluation (bench/context.py's eval_mode, bench/simulator.py's prediction modules)."""
from benchmarks.mutation_check import Mutation

TESTS = ("tests/test_eval_mode.py",)
MUTATIONS = [
    Mutation(name="simulator: evaluate in the modules' current (training) mode", file="bench/context.py",
             old="            m.training = False\n", new="            pass\n", tests=TESTS),
    Mutation(name="simulator: leave the modules in eval mode after evaluation", file="bench/context.py",
             old="            m.training = training\n", new="            pass\n", tests=TESTS),
    Mutation(name="simulator: eval mode only for the client's state, not the server's modules",
             file="bench/simulator.py", old="modules_in(client.state, self.algo)",
             new="modules_in(client.state)", tests=TESTS),
]
