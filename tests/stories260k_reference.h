// llama2.c's published stories260K outputs (../shared/models/stories260k/SOURCE.md), all with
// `-n 200` (200 positions, BOS included), BOS first; `<0x0A>` printed as a newline.
#pragma once

namespace backprompt::testing {

// -t 0
inline constexpr const char* TEXT_GREEDY =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a "
    "big, red ball. She wanted to play with it, but it was too high.\n"
    "Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want to "
    "play with your ball, but I can't find it.\"\n"
    "Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she";

// -t 1.0 -p 1.0 -s 42
inline constexpr const char* TEXT_T1_P1_S42 =
    "Once upon a time, there was a big roof. The fox was ready to look for people inside. He saw a big rock near a big "
    "tree. The roof was very small and fun! He ate the roof too. He got a shiny stool, so he sicked the roof with his "
    "friend, the girl named Mia.\n"
    "\"Help, Mia. Why are you sad, Mia?\" she asked.\n"
    "\"I want to try us,\" Mia said. \"It is cute. We have to find one of smells!\"\n"
    "Mia felt proud of";

// -t 1.0 -p 0.95 -s 42
inline constexpr const char* TEXT_T1_P095_S42 =
    "Once upon a time, there was a little boy named Timmy. Timmy loved going to the park with his mom. One day, Lily "
    "went outside to play outside in her pocket. He was scared and didn't know where to buy some colorful animals.\n"
    "Later that day, Timmy's mom came outside and saw Timmy just playing in the shore. She didn't see that made him "
    "happy, but Timmy's mom said he had to sort his cobwebs and write cold colors. Timmy asked his mom if he was "
    "amazed! His mom";

// -t 1.0 -p 0.95 -s 42 -i "There was a big"
inline constexpr const char* TEXT_PROMPT_T1_P095_S42 =
    "There was a big pretty grass. It was a long elephant. The cars wanted to tell him that as they spin before the "
    "amazing doll, just like it she was always okay.\n"
    "One day, a little girl named Lucy found a ball and an axe. She wanted to race, but she didn't know what the ball "
    "was. The ball was determined to be a nice car for Lucy.\n"
    "Lucy's friend, a little girl named Lily, said, \"Let's go to the store with my mom. I will s";

}  // namespace backprompt::testing
