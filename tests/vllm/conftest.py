import os
import sys

sys.path.insert(0, os.path.dirname(__file__))     # vllm_stack
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "plan"))     # plan_harness
