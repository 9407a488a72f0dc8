// Cache workloads (skeleton; being written).
int main() { return 0; }
