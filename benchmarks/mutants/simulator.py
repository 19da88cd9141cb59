"""Mutations of the round loop's evaluation (bench/simulator.py)."""
from benchmarks.mutation_check import Mutation

TESTS = ("tests/test_eval_mode.py",)
MUTATIONS = [
    Mutation(name="simulator: evaluate in the modules' current (training) mode", file="bench/simulator.py",
             old="            m.training = False\n", new="            pass\n", tests=TESTS),
    Mutation(name="simulator: leave the modules in eval mode after evaluation", file="bench/simulator.py",
             old="            m.training = training\n", new="            pass\n", tests=TESTS),
    Mutation(name="simulator: eval mode only for the client's state, not the server's modules",
             file="bench/simulator.py", old="modules_in(client.state, self.algo)",
             new="modules_in(client.state)", tests=TESTS),
]
