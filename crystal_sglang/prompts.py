"""Reasoning prompts: a small default set written for this project, or a MATH-500-style JSONL file (`problem`)."""

from __future__ import annotations

import json
from pathlib import Path

INSTRUCTION = "Reason step by step, explaining each step in detail, then give the final answer in \\boxed{}."

DEFAULT_PROBLEMS = (
    "A train travels 120 km in 1.5 hours, then 80 km in 1 hour. What is its average speed for the whole trip?",
    "A shop sells pencils at 3 for $0.75 and pens at 2 for $1.60. How much do 12 pencils and 5 pens cost?",
    "The sum of three consecutive even numbers is 78. What is the largest of them?",
    "A rectangle has a perimeter of 46 cm and a length 5 cm longer than its width. What is its area?",
    "A tank fills in 6 hours with pipe A and in 4 hours with pipe B. How long with both pipes open?",
    "What is the remainder when 7^100 is divided by 5?",
    "A recipe needs 3 eggs for 8 pancakes. How many eggs are needed for 52 pancakes?",
    "Solve for x: 3(x - 4) + 2x = 5x - 12 + x - 7.",
    "How many positive divisors does 360 have?",
    "A car's value drops by 15% each year. It costs $20,000 new. What is it worth after 3 years?",
    "Find the sum of all integers from 1 to 200 that are divisible by 3 or 5.",
    "Two dice are rolled. What is the probability that the sum is a prime number?",
    "A ladder 13 m long leans against a wall with its foot 5 m from the wall. How high does it reach?",
    "If f(x) = 2x^2 - 3x + 1, what is f(f(2))?",
    "A class has 28 students; 16 play football, 12 play chess and 5 play both. How many play neither?",
    "What is the least common multiple of 12, 18 and 30?",
    "A cyclist rides uphill at 12 km/h and back down the same road at 20 km/h. What is the average speed?",
    "The angles of a triangle are in the ratio 2:3:7. What is the largest angle in degrees?",
    "How many ways can 5 different books be arranged on a shelf if two particular books must be together?",
    "A sum of money doubles in 8 years at simple interest. What is the yearly rate?",
    "Find all real solutions of x^2 - 5x + 6 = 0 and give their product.",
    "A clock shows 3:40. What is the smaller angle between the hour and minute hands?",
    "The mean of five numbers is 14. Four of them are 10, 12, 15 and 20. What is the fifth?",
    "A cube has a surface area of 150 square cm. What is its volume?",
)


def load_problems(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Problems from a JSONL file with a `problem` field, else the default set."""
    if path is None:
        problems = list(DEFAULT_PROBLEMS)
    else:
        with open(path) as lines:
            problems = [json.loads(line)["problem"] for line in lines if line.strip()]
    return problems[:limit] if limit else problems


def chat_messages(problem: str) -> list[dict]:
    return [{"role": "user", "content": f"{problem}\n{INSTRUCTION}"}]
