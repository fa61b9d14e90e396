"""AgentBench v0.2's DB conversation: its instruction, the acknowledgement, and the patterns a
reply's action, SQL and final answer are read with."""

from __future__ import annotations

import re

INSTRUCTION = """
I will ask you a question, then you should help me operate a MySQL database with SQL to answer the question.
You have to explain the problem and your solution to me and write down your thoughts.
After thinking and explaining thoroughly, every round you can choose to operate or to answer.
your operation should be like this:
Action: Operation
```sql
SELECT * FROM table WHERE condition;
```
You MUST put SQL in markdown format without any other comments. Your SQL should be in one line.
Every time you can only execute one SQL statement. I will only execute the statement in the first SQL code block. Every time you write a SQL, I will execute it for you and give you the output.
If you are done operating, and you want to commit your final answer, then write down:
Action: Answer
Final Answer: ["ANSWER1", "ANSWER2", ...]
DO NOT write this pattern unless you are sure about your answer. I expect an accurate and correct answer.
Your answer should be accurate. Your answer must be exactly the same as the correct answer.
If the question is about modifying the database, then after done operation, your answer field can be anything.
If your response cannot match any pattern I mentioned earlier, you will be judged as FAIL immediately.
Your input will be raw MySQL response, you have to deal with it by yourself.
"""
"""AgentBench v0.2's `big_prompt`, verbatim (leading and trailing newline included)."""

ACKNOWLEDGEMENT = "Ok."

ACTION = re.compile(r"Action: (.*?)\n")
SQL_BLOCK = re.compile(r"```sql\n([\s\S]*?)\n```")
FINAL_ANSWER = re.compile(r"\nFinal Answer:(.*)")
