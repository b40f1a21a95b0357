"""bench/step_profile.py's bookkeeping: HLO metadata -> parts, trace events -> sums."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import step_profile  # noqa: E402

HLO = """
ENTRY %main {
  %ynn_fusion.3 = f32[1024,128]{1,0} fusion(%a, %b), kind=kCustom, metadata={op_name="jit(train_step)/transpose(jvp(MMElectra.discriminate))/encoder/l_layer_0/ffn/output/dot_general"}
  %ynn_fusion.4 = f32[1024,512]{1,0} fusion(%c, %d), kind=kCustom, metadata={op_name="jit(train_step)/jvp(MMElectra.discriminate)/encoder/l_layer_0/ffn/intermediate/dot_general"}
  %dot.7 = f32[32,32]{1,0} dot(%e, %f), metadata={op_name="jit(train_step)/jvp(MMElectra.generate)/generator/text/dot_general"}
  %add.9 = f32[128]{0} add(%g, %h), metadata={op_name="jit(train_step)/cond/branch_1_fun/add"}
}
"""


def test_op_names_reads_each_instruction_s_scope():
  names = step_profile.op_names(HLO)
  assert set(names) == {"ynn_fusion.3", "ynn_fusion.4", "dot.7", "add.9"}
  assert names["dot.7"].endswith("generator/text/dot_general")


def test_part_of_names_method_submodule_and_direction():
  names = step_profile.op_names(HLO)
  assert step_profile.part_of(names["ynn_fusion.3"]) == "discriminate/encoder bwd"
  assert step_profile.part_of(names["ynn_fusion.4"]) == "discriminate/encoder"
  assert step_profile.part_of(names["dot.7"]) == "generate/generator"
  assert step_profile.part_of(names["add.9"]) == "optimizer update (loop.guarded_update)"
  assert step_profile.part_of(None) == "(no metadata)"


def test_summarize_sums_ops_per_step_and_skips_runtime_and_python_events():
  threads = {(1, 1): "python", (1, 2): "tf_XLAEigen/1", (1, 3): "tf_XLAEigen/2"}
  events = [
      {"ph": "X", "pid": 1, "tid": 2, "name": "ynn_fusion.3", "dur": 300.0},
      {"ph": "X", "pid": 1, "tid": 3, "name": "ynn_fusion.3", "dur": 100.0},
      {"ph": "X", "pid": 1, "tid": 2, "name": "ynn_fusion.4", "dur": 200.0},
      {"ph": "X", "pid": 1, "tid": 3, "name": "dot.7", "dur": 40.0},
      {"ph": "X", "pid": 1, "tid": 2, "name": "ThunkExecutor::Execute", "dur": 9000.0},
      {"ph": "X", "pid": 1, "tid": 1, "name": "ynn_fusion.4", "dur": 9000.0},  # python thread
      {"ph": "M", "pid": 1, "tid": 2, "name": "thread_name", "args": {"name": "x"}},
  ]
  by_part, by_kind = step_profile.summarize(events, threads, step_profile.op_names(HLO), steps=2)
  assert by_part == {"discriminate/encoder bwd": 200.0, "discriminate/encoder": 100.0,
                     "generate/generator": 20.0}
  assert by_kind == {"ynn_fusion": 300.0, "dot": 20.0}
