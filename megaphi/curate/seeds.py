"""Seed lists for synthetic data: what the prompts of megaphi/curate/synthetic.py are combined from.

TOPICS maps a topic of basic Python or algorithms to its subtopics; textbooks vary audience and style,
exercises vary the function's name (a verb and a noun, as phi-1 diversified CodeExercises by function names)
and a constraint on the solution. Edit freely: prompts are combinations of these lists, so adding an entry
changes which combination an id gets (keep a corpus's seed lists fixed while it is being generated).
"""

TOPICS = {
    "variables and types": ["integers and floats", "strings and their methods", "booleans and comparisons",
                            "type conversion", "None and truthiness"],
    "control flow": ["if, elif and else", "while loops", "for loops over ranges", "break and continue",
                     "nested loops"],
    "functions": ["parameters and return values", "default and keyword arguments", "scope of variables",
                  "recursion", "functions as values and lambdas", "docstrings and type hints"],
    "lists": ["indexing and slicing", "appending, inserting and removing", "list comprehensions",
              "nested lists as matrices", "copying versus aliasing"],
    "dictionaries and sets": ["counting with dictionaries", "grouping items by a key", "set operations",
                              "iterating over keys and values", "dictionary comprehensions"],
    "strings": ["splitting and joining", "formatting with f-strings", "palindromes and reversal",
                "searching in text", "character codes with ord and chr"],
    "tuples and unpacking": ["tuple unpacking", "returning several values", "zip and enumerate",
                             "sorting tuples by a field"],
    "errors and exceptions": ["try and except", "raising exceptions with good messages", "validating input",
                              "finally and cleanup"],
    "classes": ["a first class with __init__", "methods and attributes", "__repr__ and __eq__",
                "inheritance", "dataclasses"],
    "iteration": ["generators and yield", "iterators and next", "itertools basics", "lazy evaluation"],
    "searching": ["linear search", "binary search", "searching in a sorted matrix", "two pointers"],
    "sorting": ["bubble sort", "insertion sort", "merge sort", "quick sort", "sorting with a key function"],
    "recursion and divide and conquer": ["factorial and fibonacci", "memoization", "power sets",
                                         "permutations", "the towers of Hanoi"],
    "stacks and queues": ["a stack with a list", "balanced brackets", "queues with collections.deque",
                          "evaluating postfix expressions"],
    "linked lists and trees": ["a singly linked list", "reversing a linked list", "binary trees",
                               "tree traversals", "binary search trees"],
    "graphs": ["adjacency lists", "breadth-first search", "depth-first search", "shortest paths in a grid",
               "counting connected components"],
    "dynamic programming": ["climbing stairs", "the longest common subsequence", "the knapsack problem",
                            "coin change", "edit distance"],
    "math with code": ["prime numbers", "greatest common divisor", "digits of a number", "number bases",
                       "simple statistics: mean, median, mode"],
    "complexity": ["counting steps", "big-O of loops", "time versus memory trade-offs"],
    "files and text processing": ["reading lines from a file", "parsing CSV rows", "word frequencies",
                                  "writing results to a file"],
}

AUDIENCES = ["a complete beginner", "a high-school student", "a first-year computer science student",
             "a self-taught programmer", "a student preparing for coding interviews",
             "a scientist who is new to programming", "a child who likes puzzles", "a teacher preparing a lesson",
             "a programmer coming from another language", "a student who learns best from examples"]

STYLES = ["clear and concise, with one idea per paragraph", "friendly and encouraging",
          "Socratic: ask a question, then answer it with code", "built around a small real-world story",
          "step by step, from the simplest case to the general one", "with a common mistake and its fix",
          "rigorous, stating what each function assumes and guarantees", "playful, with a game as the example"]

VERBS = ["count", "find", "sum", "merge", "reverse", "sort", "filter", "group", "flatten", "rotate",
         "compress", "encode", "decode", "validate", "normalize", "split", "join", "search", "remove", "insert",
         "compute", "check", "convert", "generate", "transpose", "partition", "deduplicate", "rank", "shift",
         "match"]

NOUNS = ["vowels", "words", "digits", "primes", "intervals", "pairs", "matrix", "anagrams", "palindromes",
         "brackets", "duplicates", "peaks", "runs", "subarrays", "substrings", "coins", "grades", "scores",
         "dates", "temperatures", "inventory", "path", "islands", "neighbors", "frequencies", "tokens",
         "rows", "columns", "steps", "triangle"]

CONSTRAINTS = ["Use only a single loop.", "Do not use any imports.", "Solve it recursively.",
               "Run in O(n log n) time or better.", "Use a dictionary.", "Use a list comprehension.",
               "Handle empty input.", "Do not modify the input.", "Raise ValueError for invalid input.",
               "Use O(1) extra memory if you can.", "Use a helper function.", "Keep the solution under 15 lines."]
